"""Request fields -> engine `SamplingParams`, and refusing fields this server does not support;
every invalid value is a 400 naming its field."""
from __future__ import annotations

from dataclasses import replace

from loragate.engine.sampling_params import SamplingParams
from loragate.gateway.errors import APIError, bad_request


def reject_unsupported(fields: list[tuple[str, str]]) -> None:
    if fields:
        param, what = fields[0]
        raise APIError(400, f"{what} is not supported by this server", "invalid_request_error", param,
                       "unsupported_parameter")


# The engine checks every generated token against each stop sequence and stop token id on its own
# thread, so their number is bounded: 100k stop strings made every step of every request slower.
MAX_STOP_SEQUENCES = 64
MAX_STOP_TOKEN_IDS = 1024


def sampling_params(req, max_tokens: int, logprobs: int | None, vocab_size: int) -> SamplingParams:
    """Translate request fields to SamplingParams; any invalid value is a 400 naming the field."""
    if len(req.stop_list()) > MAX_STOP_SEQUENCES:
        raise bad_request(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", "stop")
    if len(req.stop_token_ids or []) > MAX_STOP_TOKEN_IDS:
        raise bad_request(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed", "stop_token_ids")
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= tok < vocab_size:
            raise bad_request(f"logit_bias token id {tok} is outside the vocabulary", "logit_bias")
        bias[tok] = value
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=bias,
        seed=req.seed,
        stop=req.stop_list(),
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
    )
    try:
        params.validate()
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    return params


def with_seed(params: SamplingParams, i: int) -> SamplingParams:
    """Choice i of n: seed+i so seeded choices differ from each other but stay reproducible."""
    if params.seed is None or i == 0:
        return params
    return replace(params, seed=params.seed + i, logit_bias=dict(params.logit_bias),
                   stop=list(params.stop), stop_token_ids=list(params.stop_token_ids))
