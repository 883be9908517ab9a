"""Held-out exact match of the demo, measured through the serving engine itself.

    python -m loragate.demo.evaluate               # 500 phrases of 1-6 unseen words per model
    python -m loragate.demo.evaluate --n 200 --max-words 12

Every phrase is made only of words the training never saw (`tasks.is_held_out`); every model (the
base and each adapter) answers every phrase, all in one mixed batch as the server would run them,
greedy, with the chat template and dtype the server uses. An answer counts when it equals the skill's
rule applied to the phrase (`loragate.demo.SKILLS`), character for character.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from loragate.demo import DEMO_MODEL_NAME, SKILLS, demo_paths
from loragate.demo.tasks import PhraseSpec, held_out


@dataclass
class ModelScore:
    """One model's result: hits of n, and a few misses to look at."""

    name: str
    hits: int
    n: int
    misses: list[tuple[str, str, str]]  # (phrase, expected, answer)

    @property
    def accuracy(self) -> float:
        return self.hits / self.n if self.n else 0.0


def answers_from_engine(jobs: list[tuple[str, str]], weights_dir=None, max_tokens: int = 200) -> list[str]:
    """Greedy answers of the demo served by our engine for (model name, message) pairs."""
    from loragate.engine.config import EngineConfig
    from loragate.engine.engine import Engine
    from loragate.engine.outputs import EngineRequest
    from loragate.engine.sampling_params import SamplingParams

    base, adapters = demo_paths() if weights_dir is None else _paths(weights_dir)
    engine = Engine(EngineConfig(model=str(base), served_model_name=DEMO_MODEL_NAME, device="cpu",
                                 adapters=tuple((n, str(p)) for n, p in adapters.items()), max_num_seqs=128,
                                 max_num_batched_tokens=4096, kv_cache_memory=256 << 20))
    engine.start()
    try:
        texts = {f"r{i}": "" for i in range(len(jobs))}
        for i, (model, message) in enumerate(jobs):
            ids = engine.tokenizer.encode_chat([{"role": "user", "content": message}])
            adapter = None if model == DEMO_MODEL_NAME else model
            engine.add_request(EngineRequest(f"r{i}", ids, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                                             adapter=adapter))
        deadline = time.monotonic() + 3600
        while engine.has_work():
            if time.monotonic() > deadline:
                raise TimeoutError("evaluation did not finish within an hour")
            if engine.adapters is not None:
                engine.adapters.wait_idle(timeout=30)
            for out in engine.step():
                if out.error:
                    raise RuntimeError(f"{out.request_id}: {out.error}")
                texts[out.request_id] += out.new_text
        return [texts[f"r{i}"] for i in range(len(jobs))]
    finally:
        engine.shutdown()


def _paths(weights_dir):
    from pathlib import Path

    root = Path(weights_dir)
    adapters = {p.name: p for p in sorted((root / "adapters").iterdir()) if (p / "adapter_config.json").is_file()}
    return root / "base", adapters


def evaluate(n: int = 500, spec: PhraseSpec | None = None, seed: int = 1234, weights_dir=None,
             models: list[str] | None = None) -> list[ModelScore]:
    """Exact match per model on n held-out phrases (1-6 words unless `spec` says otherwise)."""
    phrases = held_out(n, seed=seed, spec=spec or PhraseSpec())
    models = models or list(SKILLS)
    jobs = [(m, p) for m in models for p in phrases]
    answers = answers_from_engine(jobs, weights_dir)
    scores = []
    for m in models:
        rows = [(p, SKILLS[m](p), a) for (mm, p), a in zip(jobs, answers) if mm == m]
        misses = [r for r in rows if r[1] != r[2]]
        scores.append(ModelScore(m, len(rows) - len(misses), len(rows), misses[:5]))
    return scores


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="held-out phrases per model")
    ap.add_argument("--min-words", type=int, default=1)
    ap.add_argument("--max-words", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--weights", default=None, help="a weights folder other than the shipped one")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    spec = PhraseSpec(args.min_words, args.max_words, max(80, 14 * args.max_words))
    start = time.time()
    scores = evaluate(args.n, spec, args.seed, args.weights)
    print(f"held-out exact match, {args.n} phrases of {args.min_words}-{args.max_words} unseen words, "
          f"greedy, served by the engine ({time.time() - start:.0f} s):")
    print("| model | exact match |\n|---|---|")
    for s in scores:
        print(f"| `{s.name}` | {s.accuracy:.1%} ({s.hits}/{s.n}) |")
    for s in scores:
        for phrase, expected, got in s.misses[:3]:
            print(f"  miss {s.name}: {phrase!r} -> {got!r} (expected {expected!r})")


if __name__ == "__main__":
    main()
