"""POST /v1/chat/completions: messages -> chat template -> n engine requests -> response/SSE.

With tools, the template also receives `tools`, history turns carry `tool_calls` and `tool`
results, and each choice's text is read back as calls by a reader from gateway/tools.
"""
from __future__ import annotations

import json
import time
from typing import Any

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
from loragate.gateway.structured import compile_constraint, request_constraint
from loragate.gateway.tools import get_parser, plan_tools, reader_for

router = APIRouter()

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _template_call(call: Any, param: str) -> dict:
    """An assistant turn's tool call as chat templates expect it: arguments as an object (parsed
    from the JSON text clients send back; kept as text when it is not JSON)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_request(f"{param} must be a function call with a function.name", param)
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def template_messages(req: ChatCompletionRequest) -> list[dict]:
    """{"role", "content": str} dicts for the chat template (plus `tool_calls` on assistant turns
    that called tools, and `tool_call_id`/`name` on tool results); anything but text is a 400."""
    out = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for the tool turns answering them
    for i, msg in enumerate(req.messages):
        if msg.role not in _ROLES:
            raise APIError(400, f"messages with role {msg.role!r} are not supported by this server",
                           "invalid_request_error", f"messages[{i}].role", "unsupported_parameter")
        extra = msg.model_extra or {}
        if extra.get("function_call"):
            raise APIError(400, "function_call in messages is not supported by this server; use tool_calls",
                           "invalid_request_error", f"messages[{i}].function_call", "unsupported_parameter")
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
        entry: dict[str, Any] = {"role": _ROLES[msg.role], "content": content}
        if msg.tool_calls:
            if msg.role != "assistant":
                raise bad_request("only assistant messages carry tool_calls", f"messages[{i}].tool_calls")
            entry["tool_calls"] = [_template_call(c, f"messages[{i}].tool_calls[{j}]")
                                   for j, c in enumerate(msg.tool_calls)]
            call_names.update({c["id"]: c["function"]["name"] for c in entry["tool_calls"] if c["id"]})
        if msg.role == "tool":
            if not msg.tool_call_id:
                raise bad_request(f"messages[{i}].tool_call_id is required for tool messages",
                                  f"messages[{i}].tool_call_id")
            entry["tool_call_id"] = msg.tool_call_id
            name = msg.name or call_names.get(msg.tool_call_id)
            if name:
                entry["name"] = name
        out.append(entry)
    return out


@router.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest),
             responses=streamed(ChatCompletionResponse, 400, 401, 404, 413, 429, 500, 503))
async def create_chat_completion(request: Request, principal: Principal = Depends(authenticate)):
    ctx, rec = get_ctx(request), get_record(request)
    rec.counted = True
    req = await parse_body(request, ChatCompletionRequest)
    reject_unsupported(req.unsupported_fields())
    constraint = request_constraint(req)
    plan = plan_tools(req, get_parser(ctx.settings.tool_call_parser), constraint)
    if plan is not None and plan.constraint is not None:
        constraint = plan.constraint
    engine = ctx.engine
    target = resolve_request_model(engine, principal, req)  # model, or LoRAX-style adapter fields
    rec.model = target.label
    messages = template_messages(req)
    try:
        extra = {"tools": plan.tools} if plan is not None else {}
        prompt = engine.tokenizer.encode_chat(messages, add_generation_prompt=True, **extra)
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
    if constraint is not None:
        params.structured = constraint.spec
        await compile_constraint(engine, constraint, ctx.settings.grammar_compile_timeout)
    requests = [EngineRequest(f"chatcmpl-{rec.request_id}-{i}", list(prompt), with_seed(params, i),
                              target.adapter, principal.tenant) for i in range(req.n)]
    rec.prompt_tokens = len(prompt)
    gen = Generation(ctx, target, requests, rec)
    await gen.start()
    created = int(time.time())
    rid = f"chatcmpl-{rec.request_id}"
    states = [ChoiceState() for _ in range(req.n)]
    readers = [reader_for(plan) if plan is not None else None for _ in range(req.n)]
    fingerprint = ctx.settings.system_fingerprint

    if not req.stream:
        await collect(gen, states, request)
        rec.completion_tokens = sum(s.completion_tokens for s in states)
        choices = []
        for i, s in enumerate(states):
            message, reason = ChatResponseMessage(content="".join(s.text)), s.finish_reason
            if (reader := readers[i]) is not None:
                reader.feed(message.content or "")
                _, reason = reader.finish(reason)
                message = ChatResponseMessage(content=reader.content, tool_calls=reader.tool_calls)
            choices.append(ChatChoice(
                index=i, message=message, finish_reason=reason,
                logprobs=chat_logprobs(engine.tokenizer, s.logprobs, top_n) if req.logprobs else None))
        return ChatCompletionResponse(id=rid, created=created, model=req.model, system_fingerprint=fingerprint,
                                      choices=choices, usage=usage(len(prompt), states))

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices: list[ChatChunkChoice], use=None) -> bytes:
        return sse(ChatCompletionChunk(id=rid, created=created, model=req.model, system_fingerprint=fingerprint,
                                       choices=choices, usage=use))

    def render(i: int, out) -> list[bytes]:
        if readers[i] is not None:
            return render_read(i, out, readers[i])
        chunks = []
        if out.new_text or (req.logprobs and out.new_logprobs):
            lp = chat_logprobs(engine.tokenizer, out.new_logprobs or [], top_n) if req.logprobs else None
            chunks.append(chunk([ChatChunkChoice(index=i, delta=ChatDelta(content=out.new_text), logprobs=lp)]))
        if out.finished:
            chunks.append(chunk([ChatChunkChoice(index=i, delta=ChatDelta(), finish_reason=out.finish_reason)]))
        return chunks

    def render_read(i: int, out, reader) -> list[bytes]:
        """Content and tool-call deltas as the choice's reader sees them; logprobs ride on the
        first chunk of each engine output."""
        deltas = reader.feed(out.new_text)
        reason = None
        if out.finished:
            more, reason = reader.finish(out.finish_reason)
            deltas += more
        lp = None
        if req.logprobs and out.new_logprobs:
            lp = chat_logprobs(engine.tokenizer, out.new_logprobs, top_n)
            deltas = deltas or [ChatDelta()]
        chunks = [chunk([ChatChunkChoice(index=i, delta=d, logprobs=lp if k == 0 else None)])
                  for k, d in enumerate(deltas)]
        if out.finished:
            chunks.append(chunk([ChatChunkChoice(index=i, delta=ChatDelta(), finish_reason=reason)]))
        return chunks

    # when a grammar forces tool calls there is no content: say so from the start, as OpenAI does
    first_content = None if plan is not None and plan.forced else ""
    opening = [chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=first_content))])
               for i in range(req.n)]
    final_usage = (lambda: chunk([], usage(len(prompt), states))) if include_usage else None
    return SSEResponse(sse_events(gen, states, rec, opening, render, final_usage))
