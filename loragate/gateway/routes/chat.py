"""POST /v1/chat/completions: messages -> chat template -> n engine requests -> response/SSE."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from loragate.engine.outputs import EngineRequest
from loragate.gateway.adapter_select import resolve_request_model
from loragate.gateway.auth import Principal
from loragate.gateway.context import authenticate, get_ctx, get_record, parse_body
from loragate.gateway.errors import APIError, bad_request
from loragate.gateway.formatting import ChoiceState, chat_logprobs, usage
from loragate.gateway.generation import Generation, collect, sse_events
from loragate.gateway.openapi import json_body, streamed
from loragate.gateway.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
)
from loragate.gateway.routing import check_context
from loragate.gateway.sampling import reject_unsupported, sampling_params, with_seed
from loragate.gateway.streaming import SSEResponse, sse

router = APIRouter()

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def template_messages(req: ChatCompletionRequest) -> list[dict]:
    """Plain {"role", "content": str} dicts for the chat template; anything but text is a 400."""
    out = []
    for i, msg in enumerate(req.messages):
        if msg.role not in _ROLES:
            raise APIError(400, f"messages with role {msg.role!r} are not supported by this server",
                           "invalid_request_error", f"messages[{i}].role", "unsupported_parameter")
        extra = msg.model_extra or {}
        if extra.get("tool_calls") or extra.get("function_call"):
            raise APIError(400, "tool calls in messages are not supported by this server",
                           "invalid_request_error", f"messages[{i}].tool_calls", "unsupported_parameter")
        content = msg.content
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type")
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"content parts of type {kind!r} are not supported by this server",
                                   "invalid_request_error", f"messages[{i}].content", "unsupported_parameter")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None:
            if msg.role != "assistant":
                raise bad_request(f"messages[{i}].content is required", f"messages[{i}].content")
            content = ""
        out.append({"role": _ROLES[msg.role], "content": content})
    return out


@router.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest),
             responses=streamed(ChatCompletionResponse, 400, 401, 404, 413, 429, 500, 503))
async def create_chat_completion(request: Request, principal: Principal = Depends(authenticate)):
    ctx, rec = get_ctx(request), get_record(request)
    rec.counted = True
    req = await parse_body(request, ChatCompletionRequest)
    reject_unsupported(req.unsupported_fields())
    engine = ctx.engine
    target = resolve_request_model(engine, principal, req)  # model, or LoRAX-style adapter fields
    rec.model = target.label
    try:
        prompt = engine.tokenizer.encode_chat(template_messages(req), add_generation_prompt=True)
    except ValueError as exc:
        raise bad_request(f"could not apply the chat template: {exc}", "messages") from None
    if req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    elif req.max_tokens is not None:
        max_tokens = req.max_tokens
    else:
        max_tokens = max(engine.max_model_len - len(prompt), 1)
    check_context(engine, len(prompt), max_tokens, "messages")
    top_n = (req.top_logprobs or 0) if req.logprobs else 0
    params = sampling_params(req, max_tokens, top_n if req.logprobs else None, engine.tokenizer.vocab_size)
    requests = [EngineRequest(f"chatcmpl-{rec.request_id}-{i}", list(prompt), with_seed(params, i),
                              target.adapter, principal.tenant) for i in range(req.n)]
    rec.prompt_tokens = len(prompt)
    gen = Generation(ctx, target, requests, rec)
    await gen.start()
    created = int(time.time())
    rid = f"chatcmpl-{rec.request_id}"
    states = [ChoiceState() for _ in range(req.n)]
    fingerprint = ctx.settings.system_fingerprint

    if not req.stream:
        await collect(gen, states, request)
        rec.completion_tokens = sum(s.completion_tokens for s in states)
        choices = [
            ChatChoice(index=i, message=ChatResponseMessage(content="".join(s.text)),
                       logprobs=chat_logprobs(engine.tokenizer, s.logprobs, top_n) if req.logprobs else None,
                       finish_reason=s.finish_reason)
            for i, s in enumerate(states)
        ]
        return ChatCompletionResponse(id=rid, created=created, model=req.model, system_fingerprint=fingerprint,
                                      choices=choices, usage=usage(len(prompt), states))

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices: list[ChatChunkChoice], use=None) -> bytes:
        return sse(ChatCompletionChunk(id=rid, created=created, model=req.model, system_fingerprint=fingerprint,
                                       choices=choices, usage=use))

    def render(i: int, out) -> list[bytes]:
        chunks = []
        if out.new_text or (req.logprobs and out.new_logprobs):
            lp = chat_logprobs(engine.tokenizer, out.new_logprobs or [], top_n) if req.logprobs else None
            chunks.append(chunk([ChatChunkChoice(index=i, delta=ChatDelta(content=out.new_text), logprobs=lp)]))
        if out.finished:
            chunks.append(chunk([ChatChunkChoice(index=i, delta=ChatDelta(), finish_reason=out.finish_reason)]))
        return chunks

    opening = [chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))]) for i in range(req.n)]
    final_usage = (lambda: chunk([], usage(len(prompt), states))) if include_usage else None
    return SSEResponse(sse_events(gen, states, rec, opening, render, final_usage))
