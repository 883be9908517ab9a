"""vLLM's extra endpoints, in vLLM's request and response shapes, for code written against vLLM:

- `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and
  `POST /v1/unload_lora_adapter {"lora_name"}`: runtime adapter loading, for admin keys only and
  only from inside `--allowed-adapter-dir` (the same rules as `POST /v1/adapters`). Success is vLLM's
  plain-text line; errors are our usual OpenAI-shaped ones (vLLM's differ only in extra fields).
- `POST /tokenize` (`{"prompt"}` or chat `{"messages"}`) -> `{"count", "max_model_len", "tokens",
  "token_strs"}` and `POST /detokenize {"tokens"}` -> `{"prompt"}`. A `model`, when given, is
  checked against the key like any request, so a key cannot probe adapter names here.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from loragate.gateway.auth import Principal
from loragate.gateway.context import authenticate, get_ctx, parse_body
from loragate.gateway.errors import APIError, bad_request, from_engine_error, unsupported
from loragate.gateway.openapi import error_responses, json_body
from loragate.gateway.protocol import ChatMessage
from loragate.gateway.routes.adapters import allowed_path, require_admin
from loragate.gateway.routing import resolve_model

router = APIRouter()


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest or TokenizeChatRequest (told apart by `messages`)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    chat_template: str | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[StrictInt]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


_SUCCESS = {200: {"description": "vLLM's plain-text success line",
                  "content": {"text/plain": {"schema": {"type": "string"}}}}}


def _engine_call(fn, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        mapped = from_engine_error(exc)
        if mapped is None:
            raise
        raise mapped from None


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, openapi_extra=json_body(LoadLoRAAdapterRequest),
             responses={**_SUCCESS, **error_responses(400, 401, 403, 413, 503)})
async def load_lora_adapter(request: Request, _: Principal = Depends(require_admin)) -> PlainTextResponse:
    ctx = get_ctx(request)
    body = await parse_body(request, LoadLoRAAdapterRequest)
    name = body.lora_name
    if name == ctx.engine.model_name or ctx.engine.has_adapter(name):
        raise bad_request(f"The lora adapter '{name}' has already been loaded.", "lora_name", "adapter_exists")
    path = allowed_path(body.lora_path, ctx.settings.allowed_adapter_dirs)
    if not Path(path).is_dir():
        raise bad_request(f"no adapter directory at {body.lora_path!r}", "lora_path", "adapter_not_found")
    _engine_call(ctx.engine.register_adapter, name, path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
             openapi_extra=json_body(UnloadLoRAAdapterRequest),
             responses={**_SUCCESS, **error_responses(400, 401, 403, 404, 413, 503)})
async def unload_lora_adapter(request: Request, _: Principal = Depends(require_admin)) -> PlainTextResponse:
    ctx = get_ctx(request)
    body = await parse_body(request, UnloadLoRAAdapterRequest)
    name = body.lora_name
    if not ctx.engine.has_adapter(name):
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", "invalid_request_error", "lora_name",
                       "model_not_found")
    try:
        await ctx.engine.unregister_adapter(name)
    except Exception as exc:
        mapped = from_engine_error(exc)
        if mapped is None:
            raise
        raise mapped from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _check_model(ctx, principal: Principal, model: str | None) -> None:
    """Every model shares the base's tokenizer; a named one must still be visible to the key."""
    if model is not None:
        resolve_model(ctx.engine, principal, model)


@router.post("/tokenize", response_model=None, openapi_extra=json_body(TokenizeRequest),
             responses={200: {"model": TokenizeResponse}, **error_responses(400, 401, 404, 413)})
async def tokenize(request: Request, principal: Principal = Depends(authenticate)) -> dict:
    ctx = get_ctx(request)
    body = await parse_body(request, TokenizeRequest)
    _check_model(ctx, principal, body.model)
    tok = ctx.engine.tokenizer
    if body.messages is not None:
        if body.chat_template is not None:
            raise unsupported("chat_template", "a request-supplied chat_template")
        if body.continue_final_message:
            raise unsupported("continue_final_message")
        from loragate.gateway.routes.chat import template_messages

        try:
            tokens = tok.encode_chat(template_messages(SimpleNamespace(messages=body.messages)),
                                     add_generation_prompt=body.add_generation_prompt)
        except ValueError as exc:
            raise bad_request(f"could not apply the chat template: {exc}", "messages") from None
    elif body.prompt is not None:
        add = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = tok.encode(body.prompt, add_special_tokens=add)
    else:
        raise bad_request("either prompt or messages is required", "prompt")
    out: dict[str, Any] = {"count": len(tokens), "max_model_len": ctx.engine.max_model_len, "tokens": tokens,
                           "token_strs": None}
    if body.return_token_strs:
        out["token_strs"] = [tok.token_text(t) for t in tokens]
    return out


@router.post("/detokenize", response_model=None, openapi_extra=json_body(DetokenizeRequest),
             responses={200: {"model": DetokenizeResponse}, **error_responses(400, 401, 404, 413)})
async def detokenize(request: Request, principal: Principal = Depends(authenticate)) -> dict:
    ctx = get_ctx(request)
    body = await parse_body(request, DetokenizeRequest)
    _check_model(ctx, principal, body.model)
    tok = ctx.engine.tokenizer
    bad = [t for t in body.tokens if not 0 <= t < tok.vocab_size]
    if bad:
        raise bad_request(f"token ids must be in [0, {tok.vocab_size}), got {bad[0]}", "tokens")
    return {"prompt": tok.decode(list(body.tokens))}
