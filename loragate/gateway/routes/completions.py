"""POST /v1/completions: prompt(s) as text or token ids -> len(prompts) * n engine requests.

Choice index = prompt index * n + i, as in the OpenAI API.
"""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from loragate.engine.outputs import EngineRequest
from loragate.gateway.adapter_select import resolve_request_model
from loragate.gateway.auth import Principal
from loragate.gateway.context import authenticate, get_ctx, get_record, parse_body
from loragate.gateway.errors import bad_request
from loragate.gateway.formatting import ChoiceState, completion_logprobs, echo_logprobs, joined_logprobs, usage
from loragate.gateway.generation import Generation, collect, sse_events
from loragate.gateway.openapi import json_body, streamed
from loragate.gateway.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)
from loragate.gateway.routing import check_context
from loragate.gateway.sampling import reject_unsupported, sampling_params, with_seed
from loragate.gateway.streaming import SSEResponse, sse
from loragate.gateway.structured import compile_constraint, request_constraint

router = APIRouter()


def prompts_of(req: CompletionRequest, tokenizer, max_prompts: int | None = None) -> list[tuple[str | None, list[int]]]:
    """(text if given as text, token ids) for each prompt in the request; more than `max_prompts`
    prompts is a 400 before any of them is tokenized."""
    p = req.prompt
    if isinstance(p, str):
        items: list = [p]
    elif not p:
        raise bad_request("prompt must not be empty", "prompt")
    elif isinstance(p[0], int):
        items = [list(p)]
    else:
        items = list(p)
    if max_prompts is not None and len(items) > max_prompts:
        raise bad_request(f"this request asks for {len(items) * req.n} generations (prompts x n); at most "
                          f"{max_prompts * req.n} are allowed", "prompt", "too_many_choices")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, tokenizer.encode(item, add_special_tokens=True)))
        else:
            if not item:
                raise bad_request("prompt token lists must not be empty", "prompt")
            if any(t < 0 or t >= tokenizer.vocab_size for t in item):
                raise bad_request(f"prompt token ids must be in [0, {tokenizer.vocab_size})", "prompt")
            out.append((None, list(item)))
    return out


@router.post("/v1/completions", openapi_extra=json_body(CompletionRequest),
             responses=streamed(CompletionResponse, 400, 401, 404, 413, 429, 500, 503))
async def create_completion(request: Request, principal: Principal = Depends(authenticate)):
    ctx, rec = get_ctx(request), get_record(request)
    rec.counted = True
    req = await parse_body(request, CompletionRequest)
    reject_unsupported(req.unsupported_fields())
    constraint = request_constraint(req)
    engine, tok = ctx.engine, ctx.engine.tokenizer
    target = resolve_request_model(engine, principal, req)  # model, or LoRAX-style adapter fields
    rec.model = target.label
    prompts = prompts_of(req, tok, max(ctx.settings.max_choices // req.n, 1))
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    for _, ids in prompts:
        check_context(engine, len(ids), max_tokens, "prompt")
    top_n = req.logprobs or 0
    params = sampling_params(req, max_tokens, req.logprobs, tok.vocab_size)
    echo_lp = req.echo and req.logprobs is not None  # the prompt's logprobs come first (legacy OpenAI)
    if echo_lp:
        params.prompt_logprobs = req.logprobs
    if constraint is not None:
        params.structured = constraint.spec
        await compile_constraint(engine, constraint, ctx.settings.grammar_compile_timeout)
    n = req.n
    requests = [EngineRequest(f"cmpl-{rec.request_id}-{p * n + i}", list(ids), with_seed(params, i),
                              target.adapter, principal.tenant)
                for p, (_, ids) in enumerate(prompts) for i in range(n)]
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    rec.prompt_tokens = prompt_tokens
    echo = [(text if text is not None else tok.decode(ids)) if req.echo else "" for text, ids in prompts]
    gen = Generation(ctx, target, requests, rec)
    await gen.start()
    created = int(time.time())
    rid = f"cmpl-{rec.request_id}"
    states = [ChoiceState() for _ in requests]
    emitted = [len(echo[k // n]) for k in range(len(requests))]  # characters sent per choice
    fingerprint = ctx.settings.system_fingerprint

    def logprobs_for(k: int, lps) -> object:
        if req.logprobs is None:
            return None
        return completion_logprobs(tok, lps or [], top_n, emitted[k])

    def prompt_logprobs_for(k: int, entries):
        return echo_logprobs(tok, requests[k].prompt_token_ids, entries or [], top_n)

    if not req.stream:
        await collect(gen, states, request)
        rec.completion_tokens = sum(s.completion_tokens for s in states)
        choices = [CompletionChoice(index=k, text=echo[k // n] + "".join(s.text), logprobs=logprobs_for(k, s.logprobs),
                                    finish_reason=s.finish_reason) for k, s in enumerate(states)]
        if echo_lp:
            for k, c in enumerate(choices):
                c.logprobs = joined_logprobs(prompt_logprobs_for(k, states[k].prompt_logprobs), c.logprobs)
        return CompletionResponse(id=rid, created=created, model=req.model, system_fingerprint=fingerprint,
                                  choices=choices, usage=usage(prompt_tokens, states, n))

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices: list[CompletionChoice], use=None) -> bytes:
        return sse(CompletionResponse(id=rid, created=created, model=req.model, system_fingerprint=fingerprint,
                                      choices=choices, usage=use))

    def render(k: int, out) -> list[bytes]:
        chunks = []
        if echo_lp and out.prompt_logprobs is not None:  # the echo, with its logprobs, before any token
            chunks.append(chunk([CompletionChoice(index=k, text=echo[k // n],
                                                  logprobs=prompt_logprobs_for(k, out.prompt_logprobs))]))
        if out.new_text or (req.logprobs is not None and out.new_logprobs):
            chunks.append(chunk([CompletionChoice(index=k, text=out.new_text,
                                                  logprobs=logprobs_for(k, out.new_logprobs))]))
            emitted[k] += sum(len(tok.token_text(lp.token_id)) for lp in out.new_logprobs or [])
        if out.finished:
            chunks.append(chunk([CompletionChoice(index=k, text="", finish_reason=out.finish_reason)]))
        return chunks

    opening = ([chunk([CompletionChoice(index=k, text=echo[k // n])]) for k in range(len(requests))]
               if req.echo and not echo_lp else [])
    final_usage = (lambda: chunk([], usage(prompt_tokens, states, n))) if include_usage else None
    return SSEResponse(sse_events(gen, states, rec, opening, render, final_usage))
