"""The built-in demo: the skill functions, the phrase generator and its held-out split, the shipped
weights, and that each adapter still does its skill on phrases made only of words it never saw in
training (greedy decoding through transformers + PEFT, the reference the engine is held to
elsewhere)."""
from __future__ import annotations

import json
import random
import re
import string

import pytest

from loragate.demo import DEMO_DIR, DEMO_MODEL_NAME, SKILLS, demo_paths
from loragate.demo.tasks import (
    ADAPTER_SKILLS,
    PhraseSpec,
    held_out,
    is_held_out,
    phrases,
    pig_latin,
    pig_latin_word,
    random_phrase,
    random_word,
    reverse,
    shout,
    sort_words,
    split_word,
    take,
    title,
    word_key,
)

# Held-out exact-match floors for the first N_EVAL held-out phrases (1-6 unseen words each).
# `python -m loragate.demo.evaluate` measures the shipped weights on 500 phrases (README table):
# echo 99.6%, shout 99.4%, reverse 99.2%, title 99.6%, pig-latin 96.8%. The floor sits under those
# figures by the noise of 40 phrases.
ACCURACY_FLOOR: dict[str, float] = {}
DEFAULT_FLOOR = 0.9
N_EVAL = 40


@pytest.fixture(scope="module")
def sample() -> list[str]:
    rng = random.Random(7)
    return [random_phrase(rng) for _ in range(400)]


# ----------------------------------------------------------------------------- phrases


def test_phrases_look_like_typed_english(sample):
    spec = PhraseSpec()
    for p in sample:
        assert spec.min_words <= len(p.split()) <= spec.max_words and len(p) <= spec.max_chars
        assert p == " ".join(p.split()) and p.isascii()
    words = [w for p in sample for w in p.split()]
    # every kind of word a person types shows up: lower case, Capitalized, UPPER, digits, punctuation
    assert sum(w.islower() and w.isalpha() for w in words) > len(words) / 3
    assert any(w[:1].isupper() and w[1:].islower() for w in words)
    assert any(len(w) > 2 and w.isupper() and w.isalpha() for w in words)
    assert any(any(c.isdigit() for c in w) for w in words)
    assert any(c in string.punctuation for w in words for c in w)


def test_held_out_split_is_by_word_and_seeded():
    train = take(phrases(0, "train"), 2000)
    test = held_out(200)
    assert len(test) == 200 == len(set(test))
    train_words = {word_key(w) for p in train for w in p.split()}
    test_words = {word_key(w) for p in test for w in p.split()}
    assert not train_words & test_words  # no held-out word, in any case or punctuation, in training
    assert all(is_held_out(w) for w in test_words) and not any(is_held_out(w) for w in train_words)
    assert held_out(200) == test
    assert is_held_out("Moon,") == is_held_out("moon") == is_held_out("MOON")
    # about a tenth of all words are held out
    rng = random.Random(3)
    words = {word_key(random_word(rng)) for _ in range(5000)}
    assert 0.05 < sum(map(is_held_out, words)) / len(words) < 0.15


# ----------------------------------------------------------------------------- skills


def test_shout_upper_cases_letters_only(sample):
    for p in sample:
        assert shout(p) == p.upper()
        assert [c for c in shout(p) if not c.isalpha()] == [c for c in p if not c.isalpha()]


def test_reverse_is_an_involution_on_word_order(sample):
    for p in sample:
        r = reverse(p)
        assert reverse(r) == p
        assert r.split() == p.split()[::-1]
    assert reverse("Hello, how are you?") == "you? are how Hello,"


def test_sort_ignores_case_and_keeps_words(sample):
    for p in sample:
        s = sort_words(p).split()
        assert sorted(s) == sorted(p.split())
        assert [w.lower() for w in s] == sorted(w.lower() for w in s)
        assert sort_words(sort_words(p)) == sort_words(p)
    assert sort_words("moon River cat") == "cat moon River"


def test_title_capitalizes_each_word(sample):
    for p in sample:
        t = title(p)
        assert t.lower() == p.lower() and len(t.split()) == len(p.split())
        for src, dst in zip(p.split(), t.split()):
            lead, core, _ = split_word(dst)
            assert core[:1] == core[:1].upper() and dst[len(lead) + 1:] == src[len(lead) + 1:]
    assert title("hello, (world) 3rd eBay") == "Hello, (World) 3rd EBay"


def test_pig_latin_rules(sample):
    cases = {
        "moon": "oonmay", "string": "ingstray", "apple": "appleyay", "myth": "mythay",
        "Hello,": "Ellohay,", "NASA": "ASANAY", "(Queen)": "(Ueenqay)", "I": "Iyay", "42": "42",
        "3rd": "3rd", "don't": "on'tday", "...": "...",
    }
    for word, expected in cases.items():
        assert pig_latin_word(word) == expected, word
    assert pig_latin("Hello, how are you?") == "Ellohay, owhay areyay ouyay?"
    for p in sample:
        out = pig_latin(p).split()
        assert len(out) == len(p.split())
        for src, dst in zip(p.split(), out):
            lead, core, trail = split_word(src)
            if not core or not core[0].isalpha():
                assert dst == src
                continue
            assert dst.startswith(lead) and dst.endswith(trail)
            moved = split_word(dst)[1]
            assert moved.lower().endswith("ay")
            # the core's letters are all still there, rotated, before the suffix
            stem = moved[:-3] if moved.lower().endswith("yay") and core[0].lower() in "aeiou" else moved[:-2]
            assert len(stem) == len(core) and stem.lower() in (core + core).lower()


def test_skills_map_covers_base_and_adapters():
    assert set(SKILLS) == {DEMO_MODEL_NAME, *ADAPTER_SKILLS}
    assert SKILLS[DEMO_MODEL_NAME]("moon river") == "moon river"
    # the answers a person checks at a glance really differ from one model to the next
    answers = {name: fn("moon river cat") for name, fn in SKILLS.items()}
    assert len(set(answers.values())) == len(answers)


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
    assert total < 10e6


def test_tokenizer_is_one_token_per_character_with_the_chat_template():
    from transformers import AutoTokenizer

    from loragate.engine.tokenizer import Tokenizer

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
    # every printable ASCII character is its own token, so no word is out of vocabulary
    ids = tok(string.printable, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(string.printable)
    # byte-level: anything round-trips, in transformers and in the engine's own tokenizer
    ours = Tokenizer.from_pretrained(base)
    for odd in ("café — 日本語 🚀", "Hello, World! 3.14 (x)", "  two  spaces  "):
        assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd
        assert ours.decode(ours.encode(odd, add_special_tokens=False)) == odd


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
        assert hits / N_EVAL >= ACCURACY_FLOOR.get(name, DEFAULT_FLOOR), f"{name}: {hits}/{N_EVAL}, e.g. {misses}"
    finally:
        if name != DEMO_MODEL_NAME:
            model.unload()  # take the LoRA layers out again: the base is shared by the module


def test_evaluate_script_scores_every_model_through_the_engine(capsys):
    from loragate.demo.evaluate import main

    main(["--n", "12", "--threads", "1"])
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| `([\w-]+)` \| ([\d.]+)% ", out, re.MULTILINE))
    assert set(rows) == set(SKILLS)
    for name, pct in rows.items():
        assert float(pct) >= 100 * ACCURACY_FLOOR.get(name, DEFAULT_FLOOR) - 10, out  # 12 phrases: 1 miss = 8%
