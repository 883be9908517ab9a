"""Engine outputs -> OpenAI response pieces (logprobs, usage, per-choice accumulation).

Separate from the routes so chat and completions format tokens the same way, and streaming and
non-streaming paths build choices from the very same accumulated state.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from loragate.engine.outputs import RequestOutput, TokenLogprob
from loragate.gateway.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)


@dataclass
class ChoiceState:
    """Everything one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo with logprobs (completions)

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.text.append(out.new_text)
        self.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            self.logprobs.extend(out.new_logprobs)
        if out.prompt_tokens:
            self.prompt_tokens = out.prompt_tokens
            self.cached_tokens = out.cached_tokens
        self.completion_tokens = max(self.completion_tokens, out.completion_tokens, len(self.token_ids))
        if out.finished:
            self.finish_reason = out.finish_reason


def usage(prompt_tokens: int, choices: list[ChoiceState], n: int | None = None) -> Usage:
    """Prompt tokens once per distinct prompt (as OpenAI bills n>1), completion tokens summed.
    `choices` are grouped n per prompt (default: all one prompt); a prompt's cached tokens are the
    fewest any of its choices found cached, i.e. what was cached before this request (its other
    choices share the blocks the first one computes)."""
    completion = sum(c.completion_tokens for c in choices)
    n = n or len(choices) or 1
    cached = sum(min(c.cached_tokens for c in choices[i:i + n]) for i in range(0, len(choices), n))
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                 total_tokens=prompt_tokens + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def chat_logprobs(tokenizer, lps: list[TokenLogprob], top_n: int) -> ChatLogprobs:
    def entry(tok: int, lp: float) -> TopLogprob:
        return TopLogprob(token=tokenizer.token_text(tok), logprob=lp, bytes=list(tokenizer.token_bytes(tok)))

    content = []
    for lp in lps:
        e = entry(lp.token_id, lp.logprob)
        content.append(ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=e.bytes,
                                        top_logprobs=[entry(t, v) for t, v in lp.top[:top_n]]))
    return ChatLogprobs(content=content)


def echo_logprobs(tokenizer, ids: list[int], entries: list[TokenLogprob | None], top_n: int) -> CompletionLogprobs:
    """Legacy completions logprobs of the echoed prompt tokens, as OpenAI's `echo` with `logprobs`
    gave them: the first token's logprob and top_logprobs are null (nothing predicts it), the rest
    as `completion_logprobs` renders generated tokens. `entries` is the engine's prompt logprobs
    (first entry None), or empty when there are none."""
    if not entries or not ids:
        return CompletionLogprobs()
    first = tokenizer.token_text(ids[0])
    head = CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
    return joined_logprobs(head, completion_logprobs(tokenizer, entries[1:len(ids)], top_n, len(first)))


def joined_logprobs(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(text_offset=first.text_offset + then.text_offset,
                              token_logprobs=first.token_logprobs + then.token_logprobs,
                              tokens=first.tokens + then.tokens, top_logprobs=first.top_logprobs + then.top_logprobs)


def completion_logprobs(tokenizer, lps: list[TokenLogprob], top_n: int, offset: int) -> CompletionLogprobs:
    """Legacy completions logprobs; text_offset counts characters from `offset` (the length of
    text already emitted for this choice)."""
    out = CompletionLogprobs()
    for lp in lps:
        tok = tokenizer.token_text(lp.token_id)
        out.tokens.append(tok)
        out.token_logprobs.append(lp.logprob)
        out.text_offset.append(offset)
        offset += len(tok)
        top: dict[str, float] = {}
        for t, v in lp.top[:top_n]:
            top.setdefault(tokenizer.token_text(t), v)
        out.top_logprobs.append(top)
    return out
