"""Per-request sampling parameters, validated once at submission so the step loop never has to."""
from __future__ import annotations

from dataclasses import dataclass, field

from loragate.engine.structured.spec import StructuredSpec

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """What to generate and how. Mirrors the OpenAI request fields the gateway accepts.

    `temperature == 0` means greedy. `top_k <= 0` disables top-k. `logprobs` is None for no
    logprobs, else the number of top alternatives (0..20) returned beside each chosen token.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    # constrain the output to a JSON schema, regex, choice or grammar (engine/structured/spec.py)
    structured: StructuredSpec | None = None
    typical_p: float = 1.0  # locally typical sampling (LoRAX/TGI's typical_p); 1 disables it
    # logprobs of the prompt's own tokens (vLLM's prompt_logprobs): None = off, 0 = each prompt
    # token's own, k > 0 also the top k; the request then skips prefix-cache hits (prompt_logprobs.py)
    prompt_logprobs: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the offending field; the gateway turns it into a 400."""
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be non-negative")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be positive")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError("presence_penalty must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError("frequency_penalty must be in [-2, 2]")
        if not 0 < self.typical_p <= 1:
            raise ValueError("typical_p must be in (0, 1]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]")
        for tok, bias in self.logit_bias.items():
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias for token {tok} must be in [-100, 100]")
        if self.structured is not None:
            self.structured.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
