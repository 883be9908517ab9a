"""Tokenizer, chat template and incremental detokenizer, held against transformers and tiktoken."""
from __future__ import annotations

import base64
import json
import shutil
import random
from collections import Counter
from pathlib import Path

import pytest

from loragate.engine.detokenizer import TextStream
from loragate.engine.tokenizer import LLAMA3_PATTERN, Tokenizer
from loragate.testing import build_tokenizer

TEXTS = [
    "hello world",
    "  leading and trailing  ",
    "caf\u00e9 na\u00efve \u00fcber",
    "\u65e5\u672c\u8a9e \u4e2d\u6587 \u0645\u0631\u062d\u0628\u0627",
    "emoji \U0001F600\U0001F680 and \U0001F9D1\u200d\U0001F4BB",
    "<s>special</s> inside <|user|> text",
    "new\nlines\n\n\ttabs",
    "",
]

# Random text from a mix of scripts. hypothesis is not a declared test dependency, so cases come
# from a seeded generator: deterministic, and a failure names its seed.
ALPHABETS = [
    [chr(c) for c in range(0x20, 0x7F)],  # ASCII
    list("\u00e9\u00e8\u00fc\u00f1\u00e7\u00c5\u0131"),  # accents
    [chr(c) for c in range(0x4E00, 0x4FFF)],  # CJK
    [chr(c) for c in range(0x1F600, 0x1F650)],  # emoji
    [" ", "\n"],
]
CASES = 40


def random_text(rng: random.Random, max_size: int = 40) -> str:
    return "".join(rng.choice(rng.choice(ALPHABETS)) for _ in range(rng.randint(0, max_size)))


def random_texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    return [random_text(rng) for _ in range(CASES)]

# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


def auto(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def hf(tok_dir):
    return auto(tok_dir)


def variant(src: Path, dst: Path, config: dict | None = None, template_file: str | None = "keep",
            post_processor: dict | None = None) -> Path:
    """A copy of the tokenizer dir with tokenizer_config / chat_template.jinja / post-processor edited."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        cfg.update(config)
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if template_file is None:
        (dst / "chat_template.jinja").unlink()
    elif template_file != "keep":
        (dst / "chat_template.jinja").write_text(template_file)
    if post_processor is not None:
        spec = json.loads((dst / "tokenizer.json").read_text())
        spec["post_processor"] = post_processor
        (dst / "tokenizer.json").write_text(json.dumps(spec))
    return dst


# ---------------------------------------------------------------------------------------------- encode/decode
def test_encode_decode_match_transformers(tok, hf):
    for text in TEXTS:
        for special in (True, False):
            assert tok.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special)
        ids = hf.encode(text) + [tok.eos_token_id]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.bos_token_id == hf.bos_token_id
    assert tok.eos_token_ids == {hf.eos_token_id}
    assert tok.vocab_size == len(hf)
    assert tok.add_bos == (hf.encode("x")[:1] == [hf.bos_token_id])


def test_token_bytes_concatenate_to_text(tok):
    for text in random_texts(1):
        ids = tok.encode(text, add_special_tokens=False)
        raw = b"".join(tok.token_bytes(i) for i in ids)
        assert raw.decode("utf-8") == text == tok.decode(ids)
        for i in ids:
            t = tok.token_text(i)
            try:
                assert t == tok.token_bytes(i).decode("utf-8")
            except UnicodeDecodeError:
                assert t.startswith("bytes:") and bytes.fromhex(t[6:].replace("\\x", "")) == tok.token_bytes(i)


def test_bos_from_post_processor_and_generation_eos(tok_dir, tmp_path):
    pp = {"type": "TemplateProcessing",
          "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
          "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
          "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    d = variant(tok_dir, tmp_path / "bos", post_processor=pp)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 6]}))
    ours, ref = Tokenizer.from_pretrained(d), auto(d)
    assert ours.add_bos and ours.encode("hello") == ref.encode("hello") and ours.encode("hello")[0] == 1
    assert ours.encode("hello", add_special_tokens=False) == ref.encode("hello", add_special_tokens=False)
    assert ours.eos_token_ids == {2, 6}


def test_add_bos_token_in_config_is_ignored_like_transformers(tok_dir, tmp_path):
    """transformers drops add_bos_token when tokenizer.json exists; its post-processor decides."""
    d = variant(tok_dir, tmp_path / "cfgbos", config={"add_bos_token": True})
    ours, ref = Tokenizer.from_pretrained(d), auto(d)
    assert ours.encode("hello world") == ref.encode("hello world")
    assert ours.add_bos == (ref.encode("x")[:1] == [ref.bos_token_id])


def test_no_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer found"):
        Tokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- chat templates
LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n\n' + message['content'] | trim + '<|end|>' }}"
    "{% if message.meta is defined %}{{ message.meta | tojson }}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n\n' }}{% endif %}"
)
RAISING = (
    "{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "  You are terse.  "},
    {"role": "user", "content": "caf\u00e9 \U0001F600 hello", "meta": {"lang": "fran\u00e7ais", "n": 1}},
    {"role": "assistant", "content": "world", "tool_calls": None},
    {"role": "user", "content": "quick <s> fox"},
]


def assert_chat_matches(ours: Tokenizer, ref, messages=CONVERSATION):
    for gen in (True, False):
        text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == text
        ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert ours.encode_chat(messages, add_generation_prompt=gen) == list(ids)


def test_fixture_template(tok, hf):
    assert tok.chat_template == hf.chat_template
    assert_chat_matches(tok, hf)


def test_llama3_style_template_with_bos(tok_dir, tmp_path):
    d = variant(tok_dir, tmp_path / "l3", template_file=LLAMA3_STYLE)
    ours = Tokenizer.from_pretrained(d)
    assert_chat_matches(ours, auto(d))
    ids = ours.encode_chat(CONVERSATION)
    assert ids[0] == ours.bos_token_id and ids[1] != ours.bos_token_id


def test_raise_exception_template(tok_dir, tmp_path):
    d = variant(tok_dir, tmp_path / "raise", template_file=RAISING)
    ours, ref = Tokenizer.from_pretrained(d), auto(d)
    assert_chat_matches(ours, ref, CONVERSATION[:1] + CONVERSATION[3:])
    bad = [{"role": "wizard", "content": "hi"}]
    with pytest.raises(Exception, match="Unknown role: wizard"):
        ref.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match="Unknown role: wizard"):
        ours.apply_chat_template(bad)


def test_named_template_list_in_config(tok_dir, tmp_path):
    named = [{"name": "tool_use", "template": "TOOLS{{ messages | length }}"},
             {"name": "default", "template": LLAMA3_STYLE}]
    d = variant(tok_dir, tmp_path / "named", config={"chat_template": named}, template_file=None)
    ours, ref = Tokenizer.from_pretrained(d), auto(d)
    assert ours.chat_template == LLAMA3_STYLE
    assert_chat_matches(ours, ref)


def test_no_template(tok_dir, tmp_path):
    ours = Tokenizer.from_pretrained(variant(tok_dir, tmp_path / "none", template_file=None))
    with pytest.raises(ValueError, match="model has no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------------------------------- tiktoken
TIKTOKEN_CORPUS = ["hello world", "the quick brown fox", "caf\u00e9 \u65e5\u672c", "serve the model", "0123 4567"] * 5


def train_byte_bpe(corpus: list[str], merges: int) -> dict[bytes, int]:
    """A tiny byte-level BPE: all 256 single bytes, then the most frequent adjacent pairs."""
    import regex

    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in w.encode()] for text in corpus for w in regex.findall(LLAMA3_PATTERN, text)]
    for _ in range(merges):
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(out)
        words = merged
    return ranks


@pytest.fixture(scope="module")
def tiktoken_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiktoken")
    ranks = train_byte_bpe(TIKTOKEN_CORPUS, 60)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()]
    (d / "tokenizer.model").write_text("\n".join(lines) + "\n")
    n = len(ranks)
    config = {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True,
        "added_tokens_decoder": {str(n + i): {"content": c, "special": True}
                                 for i, c in enumerate(["<|begin_of_text|>", "<|eot_id|>", "<|user|>"])},
        "chat_template": "{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}{{ eos_token }}{% endfor %}",
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": n + 1}))
    return d, ranks


def test_tiktoken_matches_encoding(tiktoken_dir):
    import tiktoken

    d, ranks = tiktoken_dir
    n = len(ranks)
    ours = Tokenizer.from_pretrained(d)
    ref = tiktoken.Encoding("ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|begin_of_text|>": n, "<|eot_id|>": n + 1, "<|user|>": n + 2})
    assert ours.vocab_size == n + 3 and ours.bos_token_id == n and ours.eos_token_ids == {n + 1}
    for text in TEXTS + TIKTOKEN_CORPUS[:5]:
        ids = ref.encode(text, allowed_special="all")
        assert ours.encode(text, add_special_tokens=False) == ids
        assert ours.encode(text) == [n] + ids  # add_bos_token from tokenizer_config
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    assert any(len(ranks_tok) > 2 for ranks_tok in ranks)  # merges really happen
    assert len(ours.encode("hello world", add_special_tokens=False)) < len("hello world")
    assert ours.decode([n, *ref.encode("hi"), n + 1]) == "hi"
    chat = ours.encode_chat([{"role": "user", "content": "hello"}])
    assert chat[:2] == [n, n + 2] and chat[-1] == n + 1


@pytest.fixture(scope="module")
def tiktok(tiktoken_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tiktoken_dir[0])


def test_tiktoken_round_trip(tiktok):
    for text in random_texts(2):
        ids = tiktok.encode(text, add_special_tokens=False)
        assert tiktok.decode(ids) == text
        assert b"".join(tiktok.token_bytes(i) for i in ids) == text.encode()


def test_tiktoken_named_file(tiktoken_dir, tmp_path):
    d = tmp_path / "named"
    d.mkdir()
    shutil.copy(tiktoken_dir[0] / "tokenizer.model", d / "cl.tiktoken")
    ours = Tokenizer.from_pretrained(d)
    assert ours.decode(ours.encode("hello \u65e5\u672c")) == "hello \u65e5\u672c"
    assert ours.bos_token_id is None and not ours.add_bos


# ---------------------------------------------------------------------------------------------- detokenizer
def stream(tok, ids, prefix=None, **kw) -> tuple[list[str], bool, str]:
    ts = TextStream(tok, prefix_ids=prefix, **kw)
    deltas, stopped = [], False
    for i in ids:
        d, stopped = ts.push(i)
        deltas.append(d)
        if stopped:
            break
    final = "" if stopped else ts.finish()
    assert ts.text == "".join(deltas) + final
    return deltas, stopped, final


def generated_text(tok, prefix, ids) -> str:
    full, head = tok.decode(prefix + ids), tok.decode(prefix)
    assert full.startswith(head)
    return full[len(head):]


def test_stream_equals_full_decode(tok):
    for prompt, text in zip(random_texts(3), random_texts(4)):
        prefix = tok.encode(prompt)[-8:]
        ids = tok.encode(text, add_special_tokens=False)
        deltas, stopped, final = stream(tok, ids, prefix)
        full = generated_text(tok, prefix, ids)
        assert not stopped and "".join(deltas) + final == full
        if "\ufffd" not in full:
            assert all("\ufffd" not in d for d in deltas)


def test_partial_characters_are_held_back(tok):
    text = "\u4e8c\u4e09\U0001F64F\U0001F60E x\u00ff"
    ids = tok.encode(text, add_special_tokens=False)
    assert any(tok.token_text(i).startswith("bytes:") for i in ids)  # the fixture really splits characters
    deltas, _, final = stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas) and "" in deltas  # something was held back
    assert "".join(deltas) + final == text


def test_stop_strings(tok):
    rng = random.Random(5)
    for text in random_texts(6):
        ids = tok.encode(text, add_special_tokens=False)
        full = tok.decode(ids)
        if full:
            i = rng.randrange(len(full))
            j = rng.randint(i + 1, min(len(full), i + 6))
            stop = [full[i:j], rng.choice(["zzz", "\U0001F600x", "!?"])]
        else:
            stop = ["zzz"]
        include = rng.random() < 0.5
        deltas, stopped, final = stream(tok, ids, stop=stop, include_stop_str_in_output=include)
        out = "".join(deltas) + final
        hits = [(full.find(s), s) for s in stop if s in full]
        if hits:
            pos, s = min(hits, key=lambda h: (h[0], -len(h[1])))
            assert stopped and final == ""
            assert out == (full[: pos + len(s)] if include else full[:pos])
        else:
            assert not stopped and out == full


def test_stop_split_across_tokens_and_unfinished_stop(tok):
    text = "hello world quick brown fox"
    ids = tok.encode(text, add_special_tokens=False)
    stop = "lo wor"
    # The stop string spans several tokens, none of which contains it alone.
    assert all(stop not in tok.decode([i]) for i in ids)
    deltas, stopped, _ = stream(tok, ids, stop=[stop])
    assert stopped and "".join(deltas) == "hel"
    assert all(d in "hel" for d in deltas)
    # A stop string that starts to match at the end but never completes is released by finish().
    ids = tok.encode("hello world qui", add_special_tokens=False)
    deltas, stopped, final = stream(tok, ids, stop=["quick"])
    assert not stopped and final == "qui" and "".join(deltas) + final == "hello world qui"


def test_skip_special_tokens_in_stream(tok):
    ids = tok.encode("hello", add_special_tokens=False) + [tok.encode("<|end|>", add_special_tokens=False)[0]]
    ids += tok.encode(" world", add_special_tokens=False)
    for skip in (True, False):
        deltas, _, final = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) + final == tok.decode(ids, skip_special_tokens=skip)


def test_window_stays_small(tok):
    """Each push decodes only a few recent tokens, however long the sequence grows."""
    calls: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

    ids = tok.encode("the quick brown fox jumps over the lazy dog \U0001F600 " * 40, add_special_tokens=False)
    deltas, _, final = stream(Counting(), ids, prefix=tok.encode("hello"))
    assert "".join(deltas) + final == tok.decode(ids)
    assert len(ids) > 300 and max(calls) <= 12


def test_metaspace_prefix_keeps_leading_space(tmp_path):
    """Sentencepiece-style decoders strip the first space of a decode; prompt context keeps the
    first generated word's space, as in a full decode of prompt + output."""
    from tokenizers import Tokenizer as Raw
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = Raw(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(["hello world the quick brown fox"] * 20,
                            trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"],
                                                show_progress=False))
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    ours = Tokenizer.from_pretrained(tmp_path)
    prefix, out = ours.encode("hello"), ours.encode(" world quick")
    assert ours.decode(out) == "world quick"  # decoded alone, the leading space is stripped
    deltas, _, final = stream(ours, out, prefix=prefix)
    assert "".join(deltas) + final == " world quick" == generated_text(ours, prefix, out)
    assert ours.token_text(out[0]) == " world" or ours.token_bytes(out[0]).startswith(b" ")
