"""LoRAX's native REST API (TGI style), as `lorax-client` sends and parses it.

Request: `{"inputs": str, "parameters": {...}, "stream": bool}`. Unknown parameters are ignored (as
LoRAX's serde does); known ones are validated with LoRAX's own messages and turned into engine
`SamplingParams` here. Responses and stream events are plain dicts in LoRAX's field order.

Semantics follow LoRAX's router and its Python sampler: a request samples when `do_sample` is set
or any warper is (temperature other than 1, top_k, top_p < 1, typical_p < 1), and never at
temperature 0; a sampled request without a seed gets a random one, reported in `details.seed`.
Logprobs are the model's log-softmax after repetition/frequency/presence penalties, before
temperature and truncation (loragate's rule on every API; LoRAX reports them after its warpers).
"""
from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loragate.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from loragate.engine.structured.spec import StructuredSpec
from loragate.gateway.adapter_select import MergedAdaptersBody
from loragate.gateway.errors import APIError

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
# LoRAX's fixed schema for {"type": "json_object"} without one: any JSON object
ANY_JSON_OBJECT = {"additionalProperties": {"type": ["object", "string", "integer", "number", "boolean", "null"]},
                   "title": "ArbitraryJsonModel", "type": "object"}


class LoraxParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")
    adapter_id: str | None = None
    adapter_source: str | None = None
    merged_adapters: MergedAdaptersBody | None = None
    api_token: str | None = None
    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    ignore_eos_token: bool = False
    return_full_text: bool | None = None
    stop: list[str] = Field(default_factory=list)
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = None
    apply_chat_template: bool = False
    seed: int | None = None
    response_format: dict[str, Any] | None = None


class LoraxRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    inputs: str
    parameters: LoraxParameters = Field(default_factory=LoraxParameters)
    stream: bool = False


def invalid(message: str, param: str | None = None) -> APIError:
    """LoRAX's validation error (rendered as 422 `validation` by the route)."""
    return APIError(400, message, "invalid_request_error", param, "validation")


def check(p: LoraxParameters, stream: bool) -> None:
    """LoRAX's validation rules, with its messages."""
    if p.watermark:
        raise invalid("watermark is not supported by this server", "watermark")
    if p.decoder_input_details and stream:  # LoRAX's rule: the stream has no prefill details
        raise invalid("`decoder_input_details` == true is not supported when streaming tokens",
                      "decoder_input_details")
    best_of = p.best_of if p.best_of is not None else 1
    if best_of < 1:
        raise invalid("`best_of` must be strictly positive", "best_of")
    if best_of > 1:
        if stream:
            raise invalid("`best_of` != 1 is not supported when streaming tokens", "best_of")
        if p.seed is not None:
            raise invalid("`seed` must not be set when `best_of` > 1", "seed")
        if not sampling(p):
            raise invalid("you must use sampling when `best_of` is > 1", "best_of")
        if best_of > 16:
            raise invalid(f"`best_of` must be > 0 and <= 16. Given: {best_of}", "best_of")
    checks = [
        (p.temperature is not None and p.temperature < 0, "`temperature` must be non-negative", "temperature"),
        (p.repetition_penalty is not None and p.repetition_penalty <= 0,
         "`repetition_penalty` must be strictly positive", "repetition_penalty"),
        (p.frequency_penalty is not None and not -2 <= p.frequency_penalty <= 2,
         "`frequency_penalty` must be >= -2.0 and <= 2.0", "frequency_penalty"),
        (p.presence_penalty is not None and not -2 <= p.presence_penalty <= 2,
         "`presence_penalty` must be >= -2.0 and <= 2.0", "presence_penalty"),
        (p.top_p is not None and not 0 < p.top_p <= 1, "`top_p` must be > 0.0 and < 1.0", "top_p"),
        (p.typical_p is not None and not 0 < p.typical_p < 1, "`typical_p` must be > 0.0 and < 1.0", "typical_p"),
        (p.top_k is not None and p.top_k <= 0, "`top_k` must be strictly positive", "top_k"),
        (p.return_k_alternatives is not None and not 0 < p.return_k_alternatives <= MAX_LOGPROBS,
         f"`return_k_alternatives` must be strictly positive and at most {MAX_LOGPROBS}", "return_k_alternatives"),
        (p.max_new_tokens is not None and p.max_new_tokens <= 0, "`max_new_tokens` must be strictly positive",
         "max_new_tokens"),
        (p.truncate is not None and p.truncate <= 0, "`truncate` must be strictly positive", "truncate"),
        (p.seed is not None and p.seed < 0, "`seed` must be positive", "seed"),
        (len(p.stop) > 16, f"`stop` supports up to 16 stop sequences. Given: {len(p.stop)}", "stop"),
    ]
    for bad, message, param in checks:
        if bad:
            raise invalid(message, param)
    if p.adapter_id and p.merged_adapters is not None:
        raise invalid("at most one of `adapter_id` or `merged_adapters` may be provided", "merged_adapters")


def sampling(p: LoraxParameters) -> bool:
    """LoRAX's rule (its NextTokenChooser): sample when asked or when any warper is active, but
    never at temperature 0."""
    warpers = ((p.temperature is not None and p.temperature not in (0.0, 1.0)) or bool(p.top_k)
               or (p.top_p is not None and p.top_p < 1.0) or (p.typical_p is not None and p.typical_p < 1.0))
    return (p.do_sample or warpers) and p.temperature != 0


def structured_spec(response_format: dict[str, Any] | None) -> Any:
    """LoRAX's `response_format` ({"type": "json_object" | "json_schema" | "text", "schema": {...}})
    as the engine's structured-output spec, or None for none/text. The schema is checked with
    `jsonschema` here so a bad one is a 422 naming the field; the route then compiles it (with the
    same time limit as the OpenAI routes) before any engine work."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise invalid(f"response_format.type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, got {kind!r}",
                      "response_format.type")
    if kind == "text":
        return None
    schema = response_format.get("schema")
    if schema is None and isinstance(response_format.get("json_schema"), dict):
        schema = response_format["json_schema"].get("schema")
    if schema is None:
        schema = ANY_JSON_OBJECT
    if not isinstance(schema, dict):
        raise invalid("response_format.schema must be a JSON object (a JSON schema)", "response_format.schema")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise invalid(f"response_format.schema is not a valid JSON schema: {exc.message}",
                      "response_format.schema") from None
    return StructuredSpec.json(schema)


def sampling_params(p: LoraxParameters, max_new_tokens: int, details: bool) -> tuple[SamplingParams, bool]:
    """LoRAX parameters -> SamplingParams (and whether the request samples). Logprobs are always
    requested when token details will be sent (every stream event carries one); prompt-token
    logprobs only for `details` with `decoder_input_details` (they fill `details.prefill`)."""
    sample = sampling(p)
    seed = p.seed if p.seed is not None else (secrets.randbits(62) if sample else None)
    params = SamplingParams(
        max_tokens=max_new_tokens,
        temperature=(1.0 if p.temperature is None else p.temperature) if sample else 0.0,
        top_p=1.0 if p.top_p is None else p.top_p,
        top_k=p.top_k or 0,
        typical_p=1.0 if p.typical_p is None else p.typical_p,
        repetition_penalty=p.repetition_penalty or 1.0,
        presence_penalty=p.presence_penalty or 0.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        seed=seed if sample else None,
        stop=list(p.stop),
        ignore_eos=p.ignore_eos_token,
        logprobs=(p.return_k_alternatives or 0) if details else None,
        structured=structured_spec(p.response_format),
        prompt_logprobs=0 if p.details and p.decoder_input_details else None,
    )
    try:
        params.validate()
    except ValueError as exc:
        raise invalid(str(exc)) from None
    return params, sample


# ---- responses -------------------------------------------------------------------------------------
# The routes build plain dicts (in LoRAX's field order); these models only describe them in the
# OpenAPI document, with `lorax-client`'s types as the reference.

FinishReason = Literal["length", "eos_token", "stop_sequence"]


class LoraxAlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class LoraxToken(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool
    alternative_tokens: list[LoraxAlternativeToken] | None = None
    skipped: bool = False


class LoraxPrefillToken(BaseModel):
    """A prompt token (with `decoder_input_details`): its logprob given the tokens before it;
    null for the first, which nothing predicts (LoRAX sends NaN as null)."""

    id: int
    text: str
    logprob: float | None = None


class LoraxBestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[LoraxPrefillToken]
    tokens: list[LoraxToken]


class LoraxDetails(BaseModel):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    skipped_tokens: int = 0
    seed: int | None = None
    prefill: list[LoraxPrefillToken]
    tokens: list[LoraxToken]
    best_of_sequences: list[LoraxBestOfSequence] | None = None


class LoraxGenerateResponse(BaseModel):
    """`POST /generate`'s answer (and, in a list of one, `POST /`'s)."""

    generated_text: str
    details: LoraxDetails | None = None


class LoraxStreamDetails(BaseModel):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None


class LoraxStreamResponse(BaseModel):
    """One stream event: a token; the last also carries generated_text (and details if asked)."""

    token: LoraxToken
    generated_text: str | None = None
    details: LoraxStreamDetails | None = None


class LoraxErrorResponse(BaseModel):
    """Every error the LoRAX routes return (and a stream's error event), as LoRAX sends it."""

    error: str
    error_type: Literal["validation", "generation", "overloaded", "authentication", "permission", "unhealthy",
                        "incomplete_generation"]


def token(tid: int, text: str, logprob: float, special: bool, alternatives: list[dict] | None) -> dict:
    out: dict[str, Any] = {"id": tid, "text": text, "logprob": logprob, "special": special}
    if alternatives is not None:
        out["alternative_tokens"] = alternatives
    out["skipped"] = False
    return out


def error_status(err: APIError) -> tuple[int, str]:
    """Our error -> LoRAX's (status, error_type): 422 validation, 424 adapter load or generation
    failure, 429 overloaded; auth and permission keep their statuses."""
    if err.code in ("adapter_load_error", "model_not_found", "generation_error", "aborted"):
        return 424, "generation"
    if err.status == 400:
        return 422, "validation"
    if err.status == 429 or err.code == "server_overloaded":  # LoRAX says 429 for a full queue too
        return 429, "overloaded"
    if err.status == 401:
        return 401, "authentication"
    if err.status == 403:
        return 403, "permission"
    if err.status == 503:
        return 503, "unhealthy"
    if err.status >= 500:
        return err.status, "incomplete_generation"
    return err.status, "validation"


def error_body(err: APIError) -> dict:
    return {"error": err.message, "error_type": error_status(err)[1]}
