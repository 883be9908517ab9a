"""The built-in demo: the skill functions, the shipped weights, and that each adapter still does its
skill on phrases it never saw in training (greedy decoding through transformers + PEFT, the
reference the engine is held to elsewhere)."""
from __future__ import annotations

import json
import random

import pytest

from loragate.demo import DEMO_DIR, DEMO_MODEL_NAME, SKILLS, demo_paths
from loragate.demo.tasks import (
    ADAPTER_SKILLS,
    MAX_CHARS,
    WORDS,
    held_out,
    is_held_out,
    phrases,
    pig_latin,
    pig_latin_word,
    random_phrase,
    reverse,
    shout,
    sort_words,
    take,
)

# Held-out exact-match floors for the first N_EVAL held-out phrases. On 100 held-out phrases the
# shipped weights measured 100% for echo, shout, reverse and pig-latin and 95% for sort.
ACCURACY_FLOOR = {
    DEMO_MODEL_NAME: 0.95,
    "shout": 0.95,
    "reverse": 0.95,
    "sort": 0.85,
    "pig-latin": 0.95,
}
N_EVAL = 20


@pytest.fixture(scope="module")
def sample() -> list[str]:
    rng = random.Random(7)
    return [random_phrase(rng) for _ in range(300)]


# ----------------------------------------------------------------------------- skills


def test_phrases_are_short_distinct_known_words(sample):
    for p in sample:
        words = p.split()
        assert 2 <= len(words) <= 5 and len(p) <= MAX_CHARS
        assert len(set(words)) == len(words)
        assert all(w in WORDS for w in words)


def test_shout_upper_cases_and_keeps_letters(sample):
    for p in sample:
        assert shout(p) == p.upper()
        assert shout(p).lower() == p


def test_reverse_is_an_involution_on_word_order(sample):
    for p in sample:
        r = reverse(p)
        assert reverse(r) == p
        assert r.split() == p.split()[::-1]
        assert sorted(r.split()) == sorted(p.split())


def test_sort_is_ordered_permutation_and_idempotent(sample):
    for p in sample:
        s = sort_words(p).split()
        assert s == sorted(s) and sorted(p.split()) == s
        assert sort_words(sort_words(p)) == sort_words(p)


def test_pig_latin_rules(sample):
    assert pig_latin_word("moon") == "oonmay"
    assert pig_latin_word("stone") == "onestay"
    assert pig_latin_word("apple") == "appleyay"
    for p in sample:
        out = pig_latin(p).split()
        assert len(out) == len(p.split())
        for src, dst in zip(p.split(), out):
            if src[0] in "aeiou":
                assert dst == src + "yay"
            else:  # a rotation of the word that starts at its first vowel, then "ay"
                core = dst[:-2]
                assert dst.endswith("ay") and core in src + src and len(core) == len(src)
                assert core[0] in "aeiou" and not set(src[: src.index(core[0])]) & set("aeiou")


def test_skills_map_covers_base_and_adapters():
    assert set(SKILLS) == {DEMO_MODEL_NAME, *ADAPTER_SKILLS}
    assert SKILLS[DEMO_MODEL_NAME]("moon river") == "moon river"
    assert SKILLS["shout"]("moon river") == "MOON RIVER"
    assert SKILLS["reverse"]("moon river cat") == "cat river moon"
    assert SKILLS["sort"]("moon river cat") == "cat moon river"
    assert SKILLS["pig-latin"]("moon river") == "oonmay iverray"
    # the answers a person checks at a glance really differ from one adapter to the next
    answers = {name: fn("moon river cat") for name, fn in SKILLS.items()}
    assert len(set(answers.values())) == len(answers)


def test_held_out_split_is_disjoint_from_training_and_seeded():
    train = set(take(phrases(0, "train"), 2000))
    test = held_out(100)
    assert len(test) == 100 == len(set(test))
    assert not train & set(test)
    assert all(is_held_out(p) for p in test) and not any(is_held_out(p) for p in train)
    assert held_out(100) == test


# ----------------------------------------------------------------------------- shipped weights


def test_shipped_weights_exist_and_are_small():
    base, adapters = demo_paths()
    assert base == DEMO_DIR / "base"
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (base / name).is_file(), name
    assert set(adapters) == set(ADAPTER_SKILLS)
    for path in adapters.values():
        assert (path / "adapter_model.safetensors").is_file()
        assert not list(path.glob("*.bin")), "no pickled weights"
        conf = json.loads((path / "adapter_config.json").read_text())
        assert conf["base_model_name_or_path"] == DEMO_MODEL_NAME
    total = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert total < 15e6


def test_tokenizer_chat_template_and_eos():
    from transformers import AutoTokenizer

    base, _ = demo_paths()
    tok = AutoTokenizer.from_pretrained(str(base))
    conf = json.loads((base / "config.json").read_text())
    gen = json.loads((base / "generation_config.json").read_text())
    eos = tok.convert_tokens_to_ids("<|end|>")
    assert tok.eos_token == "<|end|>" and conf["eos_token_id"] == eos
    assert gen["eos_token_id"] == eos or eos in gen["eos_token_id"]
    assert conf["tie_word_embeddings"] is True
    text = tok.apply_chat_template([{"role": "user", "content": "moon river"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<s><|user|>\nmoon river<|end|>\n<|assistant|>\n"
    # every demo word is a single token, in every form a skill can output
    for w in WORDS:
        for form in (w, w.upper(), pig_latin_word(w)):
            assert len(tok(form, add_special_tokens=False)["input_ids"]) == 1, form
    # byte-level: anything round-trips
    odd = "café — 日本語 🚀"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd


@pytest.fixture(scope="module")
def demo_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    base, _ = demo_paths()
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    return tok, model


@pytest.mark.parametrize("name", [DEMO_MODEL_NAME, *ADAPTER_SKILLS])
def test_held_out_accuracy(demo_model, name):
    from peft import PeftModel

    from loragate.demo.train import generate_answers

    tok, base = demo_model
    _, adapters = demo_paths()
    model = base
    if name != DEMO_MODEL_NAME:
        model = PeftModel.from_pretrained(base, str(adapters[name])).eval()
    try:
        inputs = held_out(N_EVAL)
        answers = generate_answers(model, tok, inputs)
        hits = sum(a == SKILLS[name](p) for a, p in zip(answers, inputs))
        misses = [(p, a) for a, p in zip(answers, inputs) if a != SKILLS[name](p)][:3]
        assert hits / N_EVAL >= ACCURACY_FLOOR[name], f"{name}: {hits}/{N_EVAL}, e.g. {misses}"
    finally:
        if name != DEMO_MODEL_NAME:
            model.unload()  # take the LoRA layers out again: the base is shared by the module
