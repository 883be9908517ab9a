"""LoRAX's native API beside the OpenAI routes: `POST /generate`, `POST /generate_stream` and
`POST /` (`"stream": true|false`, what `lorax-client` calls), over the same `Generation` as chat
and completions, with the same keys, per-key adapter scoping and limits.

Errors use LoRAX's shape `{"error", "error_type"}` and statuses (422 validation, 424 adapter load
or generation failure, 429 overloaded); every route here is wrapped by `LoraxRoute`, which renders
any error raised on the way (auth and body limits included; anything unexpected as a 500) that
way, and a body refused before routing (413) is rendered so too (`render_error`). Bodies pass the
same size, nesting, array and unicode limits as on every route. Streams send one `data:` event
per token; the last carries `generated_text` (and `details` when asked); an error after the first
event is an event `{"error", "error_type"}`, as LoRAX sends it.
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import Scope

from loragate.engine.outputs import EngineRequest, RequestOutput
from loragate.gateway.adapter_select import AdapterAsk, select_adapter
from loragate.gateway.auth import Principal
from loragate.gateway.context import authenticate, get_ctx, get_record
from loragate.gateway.errors import APIError, internal_error
from loragate.gateway.generation import Generation, checked_outputs, classify, collect
from loragate.gateway.limits import load_json_body
from loragate.gateway.lorax_protocol import (
    LoraxErrorResponse,
    LoraxGenerateResponse,
    LoraxParameters,
    LoraxRequest,
    LoraxStreamResponse,
    check,
    error_body,
    error_status,
    invalid,
    sampling_params,
    token,
)
from loragate.gateway.openapi import error_responses, json_body, sse_content
from loragate.gateway.routing import check_context
from loragate.gateway.sampling import with_seed
from loragate.gateway.streaming import SSEResponse
from loragate.gateway.structured import Constraint, compile_constraint

log = logging.getLogger("loragate.gateway")


def lorax_error(err: APIError) -> JSONResponse:
    status, _ = error_status(err)
    return JSONResponse(error_body(err), status_code=status, headers=err.headers or None)


def render_error(scope: Scope, err: APIError) -> Response:
    """An error answered before routing (the body-size limit): LoRAX's shape on LoRAX's paths."""
    return lorax_error(err) if scope.get("path") in PATHS else err.response()


class LoraxRoute(APIRoute):
    """Renders every error of its endpoint in LoRAX's shape: APIErrors (auth included), body
    validation errors, and anything unexpected (logged, a bare 500 `incomplete_generation`)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def wrapped(request: Request):
            try:
                return await handler(request)
            except APIError as exc:
                return lorax_error(exc)
            except (RequestValidationError, ValidationError) as exc:
                errs = exc.errors()
                first = errs[0] if errs else {}
                where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
                return lorax_error(invalid(f"{where}: {first.get('msg', 'invalid value')}" if where else
                                           first.get("msg", "invalid request"), where or None))
            except Exception:
                log.exception("unhandled error in request %s", get_record(request).request_id)
                return lorax_error(internal_error())

        return wrapped


router = APIRouter(route_class=LoraxRoute)


@dataclass
class TokenState:
    """One sequence's tokens as LoRAX reports them (also the `states` entry `collect` fills)."""

    tokens: list[dict] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    last_id: int | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0


class Lorax:
    """What one request needs to turn engine outputs into LoRAX tokens and details."""

    def __init__(self, engine, params: LoraxParameters, prompt_tokens: int, seeds: list[int | None],
                 prefix: str, prompt_ids: list[int] | None = None) -> None:
        self.tok = engine.tokenizer
        self.eos = set(getattr(self.tok, "eos_token_ids", ()) or ())
        self.special_ids = self.eos | ({self.tok.bos_token_id} if getattr(self.tok, "bos_token_id", None) is not None
                                       else set())
        self.k = params.return_k_alternatives
        self.ignore_eos = params.ignore_eos_token
        self.prompt_tokens = prompt_tokens
        self.seeds = seeds
        self.prefix = prefix
        self.prompt_ids = prompt_ids or []
        self.prefill: list[dict] = []  # details.prefill, filled from the output that carries it

    def new_tokens(self, state: TokenState, out: RequestOutput) -> list[dict]:
        """The tokens `out` adds; the text of each is the detokenizer's delta (so the texts of the
        non-special tokens concatenate to `generated_text`), a special token shows its own text."""
        added = []
        lps = out.new_logprobs or []
        n = len(out.new_token_ids)
        for j, tid in enumerate(out.new_token_ids):
            lp = lps[j] if j < len(lps) else None
            special = tid in self.special_ids
            text = self.tok.token_text(tid) if special else (out.new_text if j == n - 1 else "")
            alts = None
            if self.k and lp is not None:
                alts = [{"id": t, "text": self.tok.token_text(t), "logprob": v} for t, v in lp.top[: self.k]]
            added.append(token(tid, text, lp.logprob if lp is not None else 0.0, special, alts))
        if out.prompt_logprobs is not None:
            self.prefill = self.prefill_tokens(out.prompt_logprobs)
        state.tokens.extend(added)
        state.text.append(out.new_text)
        if out.new_token_ids:
            state.last_id = out.new_token_ids[-1]
        state.completion_tokens = max(state.completion_tokens, out.completion_tokens, len(state.tokens))
        if out.finished:
            state.finish_reason = self.finish_reason(out.finish_reason, state.last_id, out.grammar_complete)
        return added

    def prefill_tokens(self, entries: list) -> list[dict]:
        """LoRAX's `details.prefill` (decoder_input_details): each prompt token decoded on its
        own, with its logprob given the tokens before it (null for the first)."""
        return [{"id": tid, "text": self.tok.decode([tid], skip_special_tokens=False),
                 "logprob": e.logprob if e is not None else None} for tid, e in zip(self.prompt_ids, entries)]

    def finish_reason(self, reason: str | None, last_id: int | None, grammar_complete: bool = False) -> str:
        if reason == "length":
            return "length"
        if (last_id in self.eos and not self.ignore_eos) or (reason == "stop" and grammar_complete):
            return "eos_token"  # a complete constrained answer ends as LoRAX's constrained decoding does
        return "stop_sequence"

    def generated_text(self, state: TokenState) -> str:
        return self.prefix + "".join(state.text)

    def sequence(self, state: TokenState, i: int) -> dict:
        return {"generated_text": self.generated_text(state), "finish_reason": state.finish_reason,
                "generated_tokens": state.completion_tokens, "seed": self.seeds[i], "prefill": self.prefill,
                "tokens": state.tokens}

    def details(self, states: list[TokenState], best: int) -> dict:
        s = states[best]
        out = {"finish_reason": s.finish_reason, "prompt_tokens": self.prompt_tokens,
               "generated_tokens": s.completion_tokens, "skipped_tokens": 0, "seed": self.seeds[best],
               "prefill": self.prefill, "tokens": s.tokens}
        if len(states) > 1:
            out["best_of_sequences"] = [self.sequence(st, i) for i, st in enumerate(states) if i != best]
        return out


class _Tracking:
    """A `collect` state that feeds a TokenState through `Lorax.new_tokens`."""

    def __init__(self, lx: Lorax, state: TokenState) -> None:
        self.lx, self.state = lx, state

    @property
    def completion_tokens(self) -> int:
        return self.state.completion_tokens

    def add(self, out: RequestOutput) -> None:
        self.lx.new_tokens(self.state, out)


def _mean_logprob(state: TokenState) -> float:
    return sum(t["logprob"] for t in state.tokens) / max(len(state.tokens), 1)


async def _run(request: Request, principal: Principal, stream: bool | None):
    """Shared by the three routes; `stream` None = as the body says (`POST /`)."""
    ctx, rec = get_ctx(request), get_record(request)
    rec.counted = True
    # the same size, nesting, array and unicode limits as every route (a 400 here is LoRAX's 422)
    data = load_json_body(await request.body(), ctx.settings.max_json_depth, ctx.max_json_items)
    body = LoraxRequest.model_validate(data)
    streaming = body.stream if stream is None else stream
    p = body.parameters
    if not body.inputs:
        raise invalid("`inputs` cannot be empty", "inputs")
    check(p, streaming)
    engine = ctx.engine
    ask = AdapterAsk(p.adapter_id or None, p.adapter_source, p.merged_adapters, p.api_token)
    target = select_adapter(engine, principal, ask, p.adapter_id or engine.model_name)
    rec.model = target.label
    if p.apply_chat_template:
        try:
            prompt = engine.tokenizer.encode_chat([{"role": "user", "content": body.inputs}],
                                                  add_generation_prompt=True)
        except ValueError as exc:
            raise invalid(f"could not apply the chat template: {exc}", "apply_chat_template") from None
    else:
        prompt = engine.tokenizer.encode(body.inputs, add_special_tokens=True)
    if p.truncate is not None and len(prompt) > p.truncate:
        prompt = prompt[-p.truncate:]
    max_new = p.max_new_tokens if p.max_new_tokens is not None else max(engine.max_model_len - len(prompt), 1)
    check_context(engine, len(prompt), max_new, "inputs")
    n = p.best_of or 1
    params, sample = sampling_params(p, max_new, details=p.details or streaming or n > 1)
    if params.structured is not None:  # a grammar that cannot compile is a 422 before any engine work
        await compile_constraint(engine, Constraint(params.structured, "response_format.schema"),
                                 ctx.settings.grammar_compile_timeout)
    # best_of: one prompt, one prefill; only the first choice computes it
    requests = [EngineRequest(f"lorax-{rec.request_id}-{i}", list(prompt),
                              with_seed(params if i == 0 else replace(params, prompt_logprobs=None), i),
                              target.adapter, principal.tenant) for i in range(n)]
    seeds = [r.params.seed if sample else None for r in requests]
    rec.prompt_tokens = len(prompt)
    lx = Lorax(engine, p, len(prompt), seeds, body.inputs if p.return_full_text else "", prompt)
    gen = Generation(ctx, target, requests, rec)
    await gen.start()
    states = [TokenState() for _ in requests]
    if not streaming:
        await collect(gen, [_Tracking(lx, s) for s in states], request)
        rec.completion_tokens = sum(s.completion_tokens for s in states)
        best = max(range(n), key=lambda i: _mean_logprob(states[i])) if n > 1 else 0
        response = {"generated_text": lx.generated_text(states[best])}
        if p.details:
            response["details"] = lx.details(states, best)
        return response if stream is False else [response]
    return SSEResponse(_events(gen, lx, states[0], rec, p.details))


def _event(payload: dict) -> bytes:
    return b"data:" + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


async def _events(gen: Generation, lx: Lorax, state: TokenState, rec, details: bool) -> AsyncIterator[bytes]:
    """One event per token, sent as it arrives; the final token's event carries generated_text (and
    details). A client that goes away closes this generator, which aborts the engine request."""
    try:
        async for _, out in checked_outputs(gen, [_Tracking(lx, state)]):
            new = state.tokens[len(state.tokens) - len(out.new_token_ids):]
            last = new.pop() if out.finished and new else None
            for tok in new:
                yield _event({"token": tok, "generated_text": None, "details": None})
            if out.finished:
                final = {"token": last or token(0, "", 0.0, True, None),
                         "generated_text": lx.generated_text(state), "details": None}
                if details:
                    final["details"] = {"finish_reason": state.finish_reason, "prompt_tokens": lx.prompt_tokens,
                                        "generated_tokens": state.completion_tokens, "seed": lx.seeds[0]}
                yield _event(final)
        rec.completion_tokens = state.completion_tokens
    except BaseException as exc:
        rec.completion_tokens = state.completion_tokens
        if not isinstance(exc, Exception):
            rec.outcome = "aborted"
            raise
        rec.outcome = "error"
        yield _event(error_body(classify(exc)))
    finally:
        await gen.aclose()


# ---- the OpenAPI document: LoRAX's request, responses and error shape ---------------------------

_ERROR_TEXT = {401: "Missing or wrong API key (`authentication`)", 403: "The key may not do this (`permission`)",
               413: "Request body too large (`validation`)",
               422: "Invalid request: a parameter out of range, unsupported or malformed (`validation`)",
               424: "The adapter could not be found or loaded, or generation failed (`generation`)",
               429: "Overloaded or rate limited, see Retry-After (`overloaded`)",
               500: "Internal error (`incomplete_generation`)",
               503: "Shutting down or engine not running, see Retry-After (`unhealthy`)"}
_ERRORS = error_responses(*_ERROR_TEXT, model=LoraxErrorResponse, text=_ERROR_TEXT)
_STREAM = sse_content(LoraxStreamResponse, "a JSON LoraxStreamResponse (one per token; the last carries "
                      "generated_text and, with details, details), or a LoraxErrorResponse if generation fails")
_DOC = {"openapi_extra": json_body(LoraxRequest)}


@router.post("/generate", **_DOC, responses={200: {"model": LoraxGenerateResponse}, **_ERRORS})
async def generate(request: Request, principal: Principal = Depends(authenticate)):
    return await _run(request, principal, stream=False)


@router.post("/generate_stream", **_DOC, responses={
    200: {"description": "A text/event-stream of `data:{json}` events", "content": _STREAM}, **_ERRORS})
async def generate_stream(request: Request, principal: Principal = Depends(authenticate)):
    return await _run(request, principal, stream=True)


@router.post("/", **_DOC, responses={
    200: {"model": list[LoraxGenerateResponse], "content": _STREAM,
          "description": "A list of one response, or with `stream: true` a text/event-stream as /generate_stream"},
    **_ERRORS})
async def compat_generate(request: Request, principal: Principal = Depends(authenticate)):
    """What `lorax-client` calls: a list of one response, or the stream, as `stream` says."""
    return await _run(request, principal, stream=None)


PATHS = frozenset(route.path for route in router.routes)  # render_error's paths: this router's
