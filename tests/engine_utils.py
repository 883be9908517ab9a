"""Helpers for engine-level tests: drive an Engine step by step and collect each request's tokens."""
from __future__ import annotations

import itertools

import torch

from loragate.engine.config import EngineConfig
from loragate.engine.engine import Engine
from loragate.engine.outputs import EngineRequest, RequestOutput
from loragate.engine.sampling_params import SamplingParams

_ids = itertools.count()


def make_engine(model_dir, **overrides) -> Engine:
    cfg = dict(model=str(model_dir), dtype="float32", device="cpu", kv_cache_memory=8 << 20, block_size=4,
               max_num_seqs=16, max_num_batched_tokens=256)
    cfg.update(overrides)
    engine = Engine(EngineConfig(**cfg))
    engine.start()
    return engine


def request(prompt: list[int], adapter: str | None = None, **params) -> EngineRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 8)
    return EngineRequest(f"req-{next(_ids)}", list(prompt), SamplingParams(**params), adapter=adapter)


def run_to_completion(engine: Engine, arrivals: dict[int, list[EngineRequest]], max_steps: int = 2000,
                      wait_adapters: bool = True) -> dict[str, list[RequestOutput]]:
    """Submit arrivals[k] before step k; step until all finish. Returns outputs per request id."""
    outputs: dict[str, list[RequestOutput]] = {}
    pending = sum(len(v) for v in arrivals.values())
    done = 0
    for step in range(max_steps):
        for req in arrivals.get(step, []):
            engine.add_request(req)
            outputs[req.request_id] = []
        if not engine.has_work() and step > max(arrivals):
            break
        if wait_adapters and engine.adapters is not None:
            engine.adapters.wait_idle(timeout=30)
        for out in engine.step():
            outputs[out.request_id].append(out)
            done += out.finished
        if done == pending and step >= max(arrivals):
            break
    assert done == pending, f"only {done}/{pending} requests finished"
    return outputs


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def random_prompts(n: int, vocab: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (L,), generator=g).tolist() for L in lens]
