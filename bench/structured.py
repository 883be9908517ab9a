"""Structured outputs: the cost of constraining every stream to a JSON schema, and of compiling it.

One run, one machine, random SmolLM-135M-shaped checkpoint (bf16 by default, CPU by default) and
10 random rank-8 adapters. 32 concurrent requests, spread round-robin over the 10 adapters, each
constrained to a 10-property JSON schema (enums, booleans, bounded integers and numbers, short
strings, a small array, a nested object), greedy. The same 32 prompts then run unconstrained with
each request's max_tokens set to the length of its constrained answer (ignore_eos), so both runs
generate exactly the same number of tokens in the same batch shapes and the ratio isolates what the
constraint costs: mask computation (llguidance), applying it, the sampler's general path, matcher
updates. Each is measured --rounds times, interleaved; reported: medians, and the median of the
per-round throughput ratios.

Compile time of the schema: cold (a full compile on the calling thread, no cache; median of
--compiles), cached (the compiler's cache hit the engine and gateway use), and the one-off cost of
building llguidance's view of the vocabulary. Also the time per step spent filling and applying the
masks during the constrained runs.

    python bench/structured.py [--rounds 3] [--dtype bfloat16] [--device auto] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid

import jsonschema
import torch

from bench.common import CACHE, machine, smollm_checkpoint, write_random_adapters
from loragate.engine.config import EngineConfig
from loragate.engine.engine import Engine
from loragate.engine.outputs import EngineRequest
from loragate.engine.sampling_params import SamplingParams
from loragate.engine.structured import StructuredSpec
from loragate.engine.structured.llg import LLGuidanceBackend

STREAMS = 32
ADAPTERS = 10
PROMPT = 32
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "name": {"type": "string", "maxLength": 8},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},  # a number's decimals are unbounded
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "email": {"type": "string", "maxLength": 12},
        "level": {"type": "integer", "minimum": 1, "maximum": 5},
        "verified": {"type": "boolean"},
        "address": {"type": "object", "properties": {"city": {"enum": ["paris", "tokyo", "lima"]},
                                                      "zip": {"type": "integer", "minimum": 0, "maximum": 99}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["id", "name", "active", "role", "score", "tags", "email", "level", "verified", "address"],
    "additionalProperties": False,
}
MAX_TOKENS = 400  # far above the longest valid answer


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, vocab, (STREAMS, PROMPT), generator=g).tolist()


def run(engine: Engine, adapters: list[str], lengths: list[int] | None) -> tuple[float, list[int], list[str]]:
    """All 32 requests at once, stepped to the end. lengths None: constrained; else unconstrained
    with these max_tokens. Returns (seconds, tokens per request, texts)."""
    ids = []
    for i, p in enumerate(prompts(engine.model_config.vocab_size)):
        if lengths is None:
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, structured=StructuredSpec.json(SCHEMA))
        else:
            params = SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True)
        rid = uuid.uuid4().hex
        ids.append(rid)
        engine.add_request(EngineRequest(rid, p, params, adapter=adapters[i % len(adapters)]))
    toks = {r: 0 for r in ids}
    texts = {r: "" for r in ids}
    reasons = {}
    t = time.perf_counter()
    while engine.has_work():
        outs = engine.step()
        if not outs and not engine.scheduler.running:
            time.sleep(0.0005)  # an adapter still loading (only in the warm-up round)
        for out in outs:
            toks[out.request_id] += len(out.new_token_ids)
            texts[out.request_id] += out.new_text
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    dt = time.perf_counter() - t
    if lengths is None:
        for r in ids:
            assert reasons[r] == "stop", (reasons[r], texts[r])
            jsonschema.validate(json.loads(texts[r]), SCHEMA)
    return dt, [toks[r] for r in ids], [texts[r] for r in ids]


class MaskTimer:
    """Times filling (llguidance) and applying the bitmasks while a constrained run goes on."""

    def __init__(self, engine: Engine) -> None:
        from loragate.engine.structured.bitmask import TokenBitmask

        self.engine, self.cls = engine, TokenBitmask
        self.fill_s = self.apply_s = 0.0
        self.steps = 0

    def __enter__(self) -> MaskTimer:
        fill, apply = self.engine.structured.bitmask, self.cls.apply
        self._saved = fill, apply

        def timed_fill(seqs):
            t = time.perf_counter()
            out = fill(seqs)
            self.fill_s += time.perf_counter() - t
            self.steps += out is not None
            return out

        def timed_apply(mask, logits):
            t = time.perf_counter()
            apply(mask, logits)
            self.apply_s += time.perf_counter() - t

        self.engine.structured.bitmask, self.cls.apply = timed_fill, timed_apply
        return self

    def __exit__(self, *exc) -> None:
        self.engine.structured.bitmask, self.cls.apply = self._saved


def compile_times(engine: Engine, n: int) -> dict[str, float]:
    spec = StructuredSpec.json(SCHEMA)
    t = time.perf_counter()
    LLGuidanceBackend.create(engine.tokenizer, engine.model_config.vocab_size, sorted(engine.eos_ids))
    vocab_s = time.perf_counter() - t
    compiler = engine.structured.compiler
    cold = []
    for _ in range(n):
        t = time.perf_counter()
        compiler.compile_now(spec)
        cold.append(time.perf_counter() - t)
    compiler.submit(spec).result()
    cached = []
    for _ in range(n):
        t = time.perf_counter()
        compiler.submit(spec).result()
        cached.append(time.perf_counter() - t)
    return {"vocab_build_ms": vocab_s * 1e3, "cold_ms": statistics.median(cold) * 1e3,
            "cached_ms": statistics.median(cached) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compiles", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    base = smollm_checkpoint(args.dtype)
    paths = write_random_adapters(base, CACHE / "adapters-r8", ADAPTERS, dtype=args.dtype)
    cfg = EngineConfig(model=str(base), dtype=args.dtype, device=args.device, max_num_seqs=STREAMS,
                       max_num_batched_tokens=2048, kv_cache_memory=1 << 30, max_loras=ADAPTERS, max_lora_rank=16,
                       adapters=tuple((p.name, str(p)) for p in paths))
    engine = Engine(cfg)
    engine.start()
    names = [p.name for p in paths]
    print(f"# bench/structured.py  {time.strftime('%Y-%m-%d')}  {machine()}  dtype={args.dtype}  "
          f"threads={torch.get_num_threads()}  {STREAMS} streams over {ADAPTERS} adapters, 10-property schema, "
          f"greedy; {args.rounds} interleaved rounds")
    compile_ms = compile_times(engine, args.compiles)
    print(f"compile: cold {compile_ms['cold_ms']:.2f} ms, cached {compile_ms['cached_ms'] * 1e3:.1f} us, "
          f"vocabulary view (once per server) {compile_ms['vocab_build_ms']:.1f} ms")
    _, lengths, _ = run(engine, names, None)  # warm-up: adapters loaded, grammar cached, lengths known
    runs: dict[str, list[float]] = {"constrained": [], "plain": []}
    with MaskTimer(engine) as masks:
        for _ in range(args.rounds):
            runs["constrained"].append(run(engine, names, None)[0])
            runs["plain"].append(run(engine, names, lengths)[0])
    total = sum(lengths)
    ratios = [p / c for c, p in zip(runs["constrained"], runs["plain"])]
    fill_ms, apply_ms = masks.fill_s / masks.steps * 1e3, masks.apply_s / masks.steps * 1e3
    step_ms = statistics.median(runs["constrained"]) / (masks.steps / args.rounds) * 1e3
    row = {"tokens": total, "mean_answer_tokens": total / STREAMS,
           "constrained_tok_s": total / statistics.median(runs["constrained"]),
           "plain_tok_s": total / statistics.median(runs["plain"]),
           "ratio": statistics.median(ratios), "per_round_ratio": ratios, "mask_fill_ms_per_step": fill_ms,
           "mask_apply_ms_per_step": apply_ms, "constrained_step_ms": step_ms,
           **compile_ms}
    print(f"{'tokens':>7} {'constrained tok/s':>18} {'plain tok/s':>12} {'ratio':>6} {'step ms':>8} "
          f"{'fill ms':>8} {'apply ms':>9}  per-round ratio")
    print(f"{total:7d} {row['constrained_tok_s']:18.1f} {row['plain_tok_s']:12.1f} {row['ratio']:6.2f} "
          f"{step_ms:8.1f} {fill_ms:8.2f} {apply_ms:9.2f}  {' '.join(f'{r:.2f}' for r in ratios)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine(), dtype=args.dtype, **row), f, indent=2)
    engine.shutdown()


if __name__ == "__main__":
    main()
