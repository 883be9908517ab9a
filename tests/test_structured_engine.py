"""Structured outputs in the engine, on random fixtures (no instruction-tuned model needed): every
constrained answer is checked against its oracle (`jsonschema`, `re.fullmatch`, the choice list,
a fresh matcher), in mixed batches of base and adapters, greedy and sampled, and the constraint
never changes what unconstrained batch mates generate."""
from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from engine_utils import make_engine, random_prompts, request, tokens
from engine_utils import run_to_completion as run_plain
from loragate.engine.structured import StructuredSpec
from loragate.engine.structured.llg import LLGuidanceBackend
from loragate.engine.structured.runtime import StructuredRuntime
from loragate.testing import build_adapter

# Finite schemas: every valid answer is short, so each must end with "stop" well within max_tokens.
SCHEMAS = [
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["color", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 42},
                                      "kind": {"const": "point"}, "tag": {"type": "string", "maxLength": 4}},
     "required": ["kind", "n", "tag"], "additionalProperties": False},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {
        "flag": {"type": "boolean"}, "level": {"enum": [1, 2, 3]}}, "required": ["flag", "level"],
        "additionalProperties": False}, "name": {"type": "string", "maxLength": 3}},
     "required": ["inner", "name"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                            "maximum": 9}, "maxItems": 3}},
     "required": ["items"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
]
SHORT = [SCHEMAS[0], SCHEMAS[4]]
MAX_TOKENS = 200  # far above the longest valid answer of any schema above


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("structured-adapters")
    return {f"s{i}": build_adapter(base, root / f"s{i}", rank=4, alpha=8, targets=t, seed=40 + i)
            for i, t in enumerate([("q_proj", "v_proj"), ("gate_proj", "down_proj")])}


@pytest.fixture(scope="module")
def engine(base, adapters):
    eng = make_engine(base, adapters=tuple((n, str(p)) for n, p in adapters.items()), max_num_seqs=64,
                      kv_cache_memory=32 << 20, max_model_len=512, max_num_batched_tokens=1024)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def prompts(base):
    from loragate.engine.model.config import ModelConfig

    return random_prompts(8, ModelConfig.from_dir(base).vocab_size, seed=21, hi=12)


def run_to_completion(engine, arrivals):
    """engine_utils' driver, after compiling every grammar the requests need, as the gateway does
    before it submits them (the driver steps without ever sleeping, so it would otherwise spin
    through its step budget while a compile thread works)."""
    for reqs in arrivals.values():
        for r in reqs:
            if r.params.structured is not None:
                try:
                    engine.structured.compiler.submit(r.params.structured).result(timeout=30)
                except ValueError:
                    pass  # an invalid grammar: the engine fails that request itself
    return run_plain(engine, arrivals)


def text(outs) -> str:
    return "".join(o.new_text for o in outs)


def fresh_matcher_accepts(engine, spec: StructuredSpec, toks: list[int], complete: bool = True) -> bool:
    """An independent check: a new matcher of the same spec takes every token, and (if `complete`)
    accepts the end of the output. A trailing EOS is the matcher's own end."""
    m = engine.structured.compiler.compile_now(spec).matcher()
    if toks and toks[-1] in engine.eos_ids:
        toks = toks[:-1]
    if not all(m.accept(t) for t in toks):
        return False
    return m.is_accepting() if complete else True


def test_finite_schemas_validate_in_mixed_batches(engine, prompts):
    models = [None, "s0", "s1"]
    cases = []
    for k, schema in enumerate(SCHEMAS):
        for temp, seed in ((0.0, None), (1.0, 7 + k)):
            for j, model in enumerate(models):
                req = request(prompts[(k + j) % len(prompts)], adapter=model, temperature=temp, seed=seed,
                              max_tokens=MAX_TOKENS, structured=StructuredSpec.json(schema))
                cases.append((req, schema))
    plain = [request(p, max_tokens=20, ignore_eos=True) for p in prompts[:3]]  # unconstrained batch mates
    outs = run_to_completion(engine, {0: [r for r, _ in cases] + plain})
    for req, schema in cases:
        o = outs[req.request_id]
        assert o[-1].finish_reason == "stop", (text(o), schema)
        jsonschema.validate(json.loads(text(o)), schema)
    assert all(outs[r.request_id][-1].finish_reason == "length" for r in plain)
    assert engine.kv.allocator.num_used == 0


@pytest.mark.parametrize("pattern", [r"[a-z]{2,6}-[0-9]{2}", r"(yes|no|maybe)!?", r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"])
def test_regex_outputs_fullmatch(engine, prompts, pattern):
    reqs = [request(p, adapter=a, temperature=t, seed=i, max_tokens=64, structured=StructuredSpec("regex", pattern))
            for i, (p, a, t) in enumerate(zip(prompts, [None, "s0", "s1"] * 3, [0.0, 1.0] * 4))]
    outs = run_to_completion(engine, {0: reqs})
    for r in reqs:
        assert re.fullmatch(pattern, text(outs[r.request_id])), text(outs[r.request_id])
        assert outs[r.request_id][-1].finish_reason == "stop"


def test_choice_outputs_are_choices(engine, prompts):
    options = ["positive", "negative", "neutral ground", "??"]
    reqs = [request(p, adapter=a, temperature=1.0, seed=i, max_tokens=32, structured=StructuredSpec.choice(options))
            for i, (p, a) in enumerate(zip(prompts, [None, "s0", "s1"] * 3))]
    outs = run_to_completion(engine, {0: reqs})
    assert all(text(outs[r.request_id]) in options for r in reqs)


@pytest.mark.parametrize("grammar", [
    'start: greeting " " name "!"\ngreeting: "hello" | "hi"\nname: /[a-z]{1,8}/',
    'root ::= "(" digit ("," digit)? ")"\ndigit ::= [0-9]',  # GBNF
])
def test_grammar_outputs_accepted_by_a_fresh_matcher(engine, prompts, grammar):
    spec = StructuredSpec("grammar", grammar)
    reqs = [request(p, adapter=a, temperature=1.0, seed=i, max_tokens=48, structured=spec)
            for i, (p, a) in enumerate(zip(prompts[:6], [None, "s0", "s1"] * 2))]
    outs = run_to_completion(engine, {0: reqs})
    for r in reqs:
        o = outs[r.request_id]
        assert o[-1].finish_reason == "stop"
        assert fresh_matcher_accepts(engine, spec, tokens(o)), text(o)


def test_unconstrained_rows_are_token_identical_beside_constrained_ones(engine, prompts):
    def plain():
        return [request(prompts[0], max_tokens=16, ignore_eos=True),
                request(prompts[1], adapter="s0", max_tokens=16, ignore_eos=True),
                request(prompts[2], adapter="s1", temperature=1.0, top_p=0.9, seed=3, max_tokens=16, ignore_eos=True)]

    alone = plain()
    ref = run_to_completion(engine, {0: alone})
    mixed = plain()
    constrained = [request(prompts[3 + i], adapter=a, temperature=t, seed=i, max_tokens=MAX_TOKENS,
                           structured=StructuredSpec.json(SCHEMAS[i])) for i, (a, t) in
                   enumerate([(None, 0.0), ("s0", 1.0), ("s1", 0.0)])]
    outs = run_to_completion(engine, {0: mixed + constrained[:2], 3: constrained[2:]})
    for a, b in zip(alone, mixed):
        assert tokens(outs[b.request_id]) == tokens(ref[a.request_id])


def test_preemption_recomputes_and_keeps_the_matcher_in_step(base, adapters, prompts):
    def run(kv_bytes):
        eng = make_engine(base, adapters=(("s0", str(adapters["s0"])),), kv_cache_memory=None,
                          cpu_kv_cache_memory=kv_bytes, max_model_len=512)
        reqs = [request(p, adapter=a, max_tokens=MAX_TOKENS, structured=StructuredSpec.json(SHORT[i % 2]))
                for i, (p, a) in enumerate(zip(prompts[:5], [None, "s0"] * 3))]
        outs = run_to_completion(eng, {0: reqs[:3], 2: reqs[3:]})
        eng.shutdown()
        return eng, [(text(outs[r.request_id]), outs[r.request_id][-1].finish_reason) for r in reqs]

    roomy, expected = run(32 << 20)
    tight, got = run(_block_bytes(base) * 8)  # 8 blocks of 4 tokens for 5 sequences: preemption
    assert roomy.scheduler.num_preemptions == 0 and tight.scheduler.num_preemptions > 0
    assert got == expected
    for (t, reason), i in zip(got, range(len(got))):
        assert reason == "stop"
        jsonschema.validate(json.loads(t), SHORT[i % 2])


def _block_bytes(base) -> int:
    import torch

    from loragate.engine.kv_cache import KVCacheSpec
    from loragate.engine.model.config import ModelConfig

    mc = ModelConfig.from_dir(base)
    return KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim, 4, torch.float32).bytes_per_block()


def test_max_tokens_gives_length_and_a_valid_prefix(engine, prompts):
    spec = StructuredSpec.json({"type": "object", "properties": {"words": {"type": "array", "items": {
        "type": "string", "maxLength": 8}, "minItems": 5, "maxItems": 9}}, "required": ["words"]})
    reqs = [request(p, max_tokens=6, temperature=1.0, seed=i, structured=spec) for i, p in enumerate(prompts[:4])]
    outs = run_to_completion(engine, {0: reqs})
    for r in reqs:
        o = outs[r.request_id]
        assert o[-1].finish_reason == "length" and len(tokens(o)) == 6
        assert fresh_matcher_accepts(engine, spec, tokens(o), complete=False)


def test_logit_bias_cannot_unmask(engine, prompts):
    vocab = engine.model_config.vocab_size
    spec = StructuredSpec.choice(["yes", "no"])
    # a +100 bias on every seventh token: still nothing outside the grammar may win
    bias = {t: 100.0 for t in range(3, vocab, 7)}
    reqs = [request(p, temperature=t, seed=i, max_tokens=8, logit_bias=bias, structured=spec, logprobs=5)
            for i, (p, t) in enumerate(zip(prompts[:4], [0.0, 1.0, 0.0, 1.0]))]
    outs = run_to_completion(engine, {0: reqs})
    for r in reqs:
        o = outs[r.request_id]
        assert text(o) in ("yes", "no")
        for out in o:  # masked tokens are never offered as alternatives
            for lp in out.new_logprobs or []:
                assert all(v > float("-inf") for _, v in lp.top)


def test_n_seeds_and_abort(engine, prompts):
    spec = StructuredSpec.json(SCHEMAS[1])
    same = [request(prompts[0], temperature=1.0, seed=5, max_tokens=MAX_TOKENS, structured=spec) for _ in range(2)]
    other = request(prompts[0], temperature=1.0, seed=6, max_tokens=MAX_TOKENS, structured=spec)
    doomed = request(prompts[1], temperature=1.0, max_tokens=MAX_TOKENS, structured=spec)
    engine.add_request(doomed)
    engine.step()
    assert engine.abort(doomed.request_id).finish_reason == "abort"
    outs = run_to_completion(engine, {0: same + [other]})
    a, b, c = (text(outs[r.request_id]) for r in same + [other])
    assert a == b  # same seed, same answer
    for t in (a, b, c):
        jsonschema.validate(json.loads(t), SCHEMAS[1])
    assert engine.kv.allocator.num_used == 0


class GatedBackend:
    """The real backend, except that compile waits until the test opens the gate."""

    def __init__(self, inner, gate: threading.Event) -> None:
        self.inner, self.gate = inner, gate
        self.vocab_size = inner.vocab_size

    def compile(self, spec):
        assert self.gate.wait(timeout=30), "gate never opened"
        return self.inner.compile(spec)

    def fill_bitmask(self, matchers, bitmask):
        self.inner.fill_bitmask(matchers, bitmask)


def test_compile_runs_off_the_step_loop(engine, prompts):
    gate = threading.Event()
    saved = engine.structured
    engine.structured = StructuredRuntime(lambda: GatedBackend(
        LLGuidanceBackend.create(engine.tokenizer, engine.model_config.vocab_size, sorted(engine.eos_ids)), gate))
    try:
        slow = request(prompts[0], max_tokens=MAX_TOKENS, structured=StructuredSpec.json(SCHEMAS[0]))
        # another client (requests of one client run in arrival order, whatever they wait for)
        fast = request(prompts[1], adapter="s0", max_tokens=10, ignore_eos=True)
        engine.add_request(slow)
        engine.add_request(fast)
        done = {}
        for _ in range(50):  # the unconstrained request runs to the end while the compile is stuck
            engine.adapters.wait_idle(timeout=30)
            for out in engine.step():
                done.setdefault(out.request_id, []).append(out)
            if fast.request_id in done and done[fast.request_id][-1].finished:
                break
        assert done[fast.request_id][-1].finish_reason == "length"
        assert slow.request_id not in done and engine.scheduler.num_waiting == 1
        gate.set()
        engine.seqs[slow.request_id].grammar.future.result(timeout=30)
        for _ in range(MAX_TOKENS + 5):  # now it joins the batch
            for out in engine.step():
                done.setdefault(out.request_id, []).append(out)
            if slow.request_id in done and done[slow.request_id][-1].finished:
                break
        assert done[slow.request_id][-1].finish_reason == "stop"
        jsonschema.validate(json.loads(text(done[slow.request_id])), SCHEMAS[0])
    finally:
        gate.set()
        engine.structured.shutdown()
        engine.structured = saved


def test_invalid_grammar_fails_only_its_request(engine, prompts):
    bad = request(prompts[0], structured=StructuredSpec("regex", "(unclosed"))
    good = request(prompts[1], max_tokens=4, ignore_eos=True)
    outs = run_to_completion(engine, {0: [bad, good]})
    assert outs[bad.request_id][-1].finish_reason == "error"
    assert "unclosed" in outs[bad.request_id][-1].error
    assert outs[good.request_id][-1].finish_reason == "length"


def test_compile_cache_is_keyed_by_grammar_text(engine):
    compiler = engine.structured.compiler
    spec = StructuredSpec.json({"type": "object", "properties": {"zz": {"type": "boolean"}}})
    first = compiler.submit(spec)
    hits = compiler.hits
    assert compiler.submit(StructuredSpec.json(json.dumps({"type": "object", "properties": {
        "zz": {"type": "boolean"}}}, separators=(",", ":")))) is first
    assert compiler.hits == hits + 1
    assert first.result(timeout=30) is compiler.submit(spec).result(timeout=30)


def test_prefix_cache_hits_keep_constrained_answers(base, adapters, prompts):
    """Prefix caching is on by default: a constrained request whose prompt is already cached (a
    repeat, and a longer prompt sharing its blocks) answers exactly as without the cache, validated."""
    shared = [t for p in prompts for t in p][:32]  # 8 full blocks of 4 tokens
    assert len(shared) == 32
    spec = StructuredSpec.json(SCHEMAS[1])

    def run(eng):
        first = request(shared, adapter="s0", max_tokens=MAX_TOKENS, structured=spec)
        again = [request(shared, adapter="s0", max_tokens=MAX_TOKENS, structured=spec),
                 request(shared + prompts[1], adapter="s0", max_tokens=MAX_TOKENS, structured=spec, temperature=1.0,
                         seed=3)]
        outs = run_to_completion(eng, {0: [first]})
        outs.update(run_to_completion(eng, {0: again}))
        return [(text(outs[r.request_id]), outs[r.request_id][-1].finish_reason, outs[r.request_id][-1].cached_tokens)
                for r in [first, *again]]

    cached = make_engine(base, adapters=(("s0", str(adapters["s0"])),), max_model_len=512)
    plain = make_engine(base, adapters=(("s0", str(adapters["s0"])),), max_model_len=512, enable_prefix_caching=False)
    try:
        got, ref = run(cached), run(plain)
    finally:
        cached.shutdown()
        plain.shutdown()
    assert got[0][2] == 0 and got[1][2] >= 28 and got[2][2] >= 28  # the repeats found the prompt's blocks
    assert [g[:2] for g in got] == [r[:2] for r in ref]
    for t, reason, _ in got:
        assert reason == "stop"
        jsonschema.validate(json.loads(t), SCHEMAS[1])
