"""A deterministic stand-in for `loragate.engine.async_engine.AsyncEngine`, for gateway tests.

Same public interface (generate / abort / adapters / stats / tokenizer), no model: the tokens a
request produces are a pure function of its prompt ids, adapter, seed and choice index, so
"same seed -> same text" and "different adapter -> different text" are real properties the tests
can check without hard-coding outputs. Switches (`dead`, `queue_full`, `fail_after`,
`token_delay`) let tests drive every error path.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from loragate.engine.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    EngineDeadError,
    PromptTooLongError,
    QueueFullError,
)
from loragate.engine.outputs import AdapterStats, EngineRequest, EngineStats, LoraState, RequestOutput, TokenLogprob

WORDS = ("alpha beta gamma delta lorem ipsum adapter token stream gateway batch kernel cache "
         "quick brown fox jumps over lazy dog hello world").split()


class FakeTokenizer:
    """One token per character: id = ord(c) + 3 (0 unk, 1 bos, 2 eos). Round-trips any text made
    of characters below U+3000."""

    OFFSET = 3
    bos_token_id = 1
    eos_token_ids = {2}
    vocab_size = 0x3000 + OFFSET

    def __init__(self, chat_template: bool = True) -> None:
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(c) + self.OFFSET if ord(c) < 0x3000 else 0 for c in text]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.token_text(i) for i in ids if not (skip_special_tokens and i < self.OFFSET))

    def token_text(self, token_id: int) -> str:
        if token_id < self.OFFSET:
            return ("<unk>", "<s>", "</s>")[token_id]
        return chr(token_id - self.OFFSET)

    def token_bytes(self, token_id: int) -> bytes:
        return self.token_text(token_id).encode("utf-8")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>\n"
        return self.encode(text)


@dataclass
class FakeConfig:
    model: str = "fake-base"
    served_model_name: str | None = "fake-base"


@dataclass
class _Adapter:
    path: str
    served: int = 0
    running: int = 0


@dataclass
class FakeEngine:
    """Deterministic fake of AsyncEngine. Generation runs one token per event-loop step."""

    model_name: str = "fake-base"
    max_model_len: int = 256
    adapters: dict[str, str] = field(default_factory=dict)  # name -> path
    token_delay: float = 0.0  # seconds between tokens (simulated compute)
    chunk_tokens: int = 1  # tokens per RequestOutput
    dead: bool = False
    queue_full: bool = False
    fail_after: int | None = None  # emit a finish_reason="error" output after this many tokens
    chat_template: bool = True
    block_size: int = 16
    max_loras: int = 4

    def __post_init__(self) -> None:
        self.config = FakeConfig(self.model_name, self.model_name)
        self.tokenizer = FakeTokenizer(self.chat_template)
        self._adapters = {n: _Adapter(p) for n, p in self.adapters.items()}
        self.started = False
        self.shut_down = False
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.requests: list[EngineRequest] = []
        self.steps = 0

    # ---- lifecycle ----
    @property
    def is_alive(self) -> bool:
        return self.started and not self.dead and not self.shut_down

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.shut_down = True

    # ---- generation ----
    def _script(self, req: EngineRequest) -> list[int]:
        """The tokens this request would produce (before max_tokens/stop), deterministic in
        (prompt, adapter, seed) when seeded or greedy, random otherwise."""
        p = req.params
        if p.seed is not None or p.temperature == 0:
            key = f"{req.prompt_token_ids}|{req.adapter}|{p.seed}|{p.temperature == 0}"
            rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
        else:
            rng = random.Random()
        n_words = rng.randint(3, 12)
        text = " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not p.ignore_eos:
            ids.append(2)
        else:  # a block of words repeated: cheap even for millions of tokens
            block: list[int] = []
            for _ in range(64):
                block += self.tokenizer.encode(" " + rng.choice(WORDS), add_special_tokens=False)
            ids += block * (max(0, p.max_tokens - len(ids)) // len(block) + 1)
        return ids

    def _check(self, req: EngineRequest) -> None:
        if self.dead or not self.started:
            raise EngineDeadError("fake engine is dead")
        if self.queue_full:
            raise QueueFullError("fake queue is full")
        req.params.validate()
        if len(req.prompt_token_ids) + req.params.max_tokens > self.max_model_len:
            raise PromptTooLongError("prompt too long")
        if req.adapter is not None and req.adapter not in self._adapters:
            raise AdapterNotFoundError(f"adapter {req.adapter!r} not found")

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self._check(request)
        rid, p = request.request_id, request.params
        self.requests.append(request)
        self.running.add(rid)
        adapter = self._adapters.get(request.adapter) if request.adapter else None
        if adapter:
            adapter.running += 1
        script = self._script(request)
        n_prompt = len(request.prompt_token_ids)
        produced: list[int] = []
        text = ""
        finished = False
        try:
            while not finished:
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                else:
                    await asyncio.sleep(0)
                if self.dead:
                    raise EngineDeadError("fake engine died")
                self.steps += 1
                if self.fail_after is not None and len(produced) >= self.fail_after:
                    finished = True
                    yield RequestOutput(rid, [], "", True, "error", prompt_tokens=n_prompt,
                                        completion_tokens=len(produced), error="fake failure")
                    return
                new_ids: list[int] = []
                reason = None
                for _ in range(self.chunk_tokens):
                    tok = script[len(produced)]
                    produced.append(tok)
                    new_ids.append(tok)
                    if (tok in self.tokenizer.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
                        reason = "stop"
                    elif len(produced) >= p.max_tokens:
                        reason = "length"
                    if reason:
                        break
                new_text = self.tokenizer.decode(new_ids) if reason != "stop" or new_ids[-1] not in \
                    (self.tokenizer.eos_token_ids | set(p.stop_token_ids)) else self.tokenizer.decode(new_ids[:-1])
                # stop strings: cut the text at the first occurrence, never emit it
                if p.stop:  # only then is the text so far kept (a long stream would copy it every chunk)
                    full = text + new_text
                    for s in p.stop:
                        at = full.find(s)
                        if at != -1:
                            full, reason = full[:at], "stop"
                    new_text, text = full[len(text):], full
                lps = None
                if p.logprobs is not None:
                    lps = [TokenLogprob(t, -0.1 * (1 + t % 7),
                                        [(t, -0.1 * (1 + t % 7))] + [(t + j, -1.0 - j) for j in range(1, p.logprobs)])
                           for t in new_ids]
                finished = reason is not None
                yield RequestOutput(rid, new_ids, new_text, finished, reason, lps, n_prompt, len(produced),
                                    queue_time=0.0)
        finally:
            self.running.discard(rid)
            if adapter:
                adapter.running -= 1
                adapter.served += 1
            if finished:
                self.finished.append(rid)
            else:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    # ---- adapters ----
    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    def list_adapters(self) -> list[AdapterStats]:
        return [AdapterStats(n, a.path, "cpu", 1024, 8, a.served, 1, 0.01) for n, a in self._adapters.items()]

    def register_adapter(self, name: str, path: str) -> AdapterStats:
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} already exists")
        if not (Path(path) / "adapter_config.json").is_file():
            raise AdapterLoadError(f"{path} has no adapter_config.json")
        self._adapters[name] = _Adapter(path)
        return AdapterStats(name, path, "disk", 1024, 8, 0, 0, None)

    async def unregister_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise AdapterNotFoundError(name)
        while self._adapters[name].running:
            await asyncio.sleep(0.001)  # the fake's "step loop": waits for running requests
        del self._adapters[name]

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), 0, len(self.running) * 2, 100, self.steps, self.is_alive)

    async def lora_state(self) -> LoraState:
        """Adapters with a running request count as resident (the fake has no slots)."""
        running = tuple(sorted(n for n, a in self._adapters.items() if a.running))
        return LoraState(running, (), self.max_loras)
