"""The model's tokenizer and chat template, loaded straight from a checkpoint directory.

Serving needs encode/decode, the special token ids, per-token bytes for logprobs and the chat template,
all identical to what `transformers.AutoTokenizer` would give on the same directory (the tests hold
them together), but without constructing a transformers tokenizer object: the fast `tokenizers`
library reads tokenizer.json, and `tiktoken` serves tiktoken-format BPE files. Only chat rendering
borrows transformers' own jinja helper (imported lazily), so templates render exactly as they do there.
"""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

# The Llama-3 pre-tokenization regex (also transformers' TikTokenConverter default).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class _Backend(Protocol):
    """What `Tokenizer` needs from either library."""

    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def token_bytes(self, token_id: int) -> bytes: ...


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores special tokens as plain strings or as serialised AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable stand-in character -> the byte it encodes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _flatten_decoders(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [d for sub in spec.get("decoders", []) for d in _flatten_decoders(sub)]
    return [spec]


class _HFBackend:
    """tokenizer.json through the `tokenizers` library, set up the way transformers' TokenizersBackend is."""

    def __init__(self, path: Path, config: dict):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RawTokenizer

        spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        self.tok = RawTokenizer.from_file(str(path / "tokenizer.json"))
        # transformers adds named special tokens the config declares but tokenizer.json lacks.
        for name in NAMED_SPECIAL_TOKENS:
            content = _token_content(config.get(name))
            if content is not None and self.tok.token_to_id(content) is None:
                self.tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        # transformers ignores add_bos_token/add_eos_token when tokenizer.json exists, and only
        # rebuilds the post-processor (adding nothing by default) when tokenizer.json has none.
        if self.tok.post_processor is None:
            from tokenizers import processors

            self.tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
        self.added = {i: t for i, t in self.tok.get_added_tokens_decoder().items()}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        decoders = _flatten_decoders(spec.get("decoder"))
        self.byte_level = any(d.get("type") == "ByteLevel" for d in decoders)
        self.byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        self.metaspace = next(
            (d.get("replacement", "\u2581") for d in decoders if d.get("type") == "Metaspace"), None
        ) or next(
            (d["pattern"].get("String") for d in decoders
             if d.get("type") == "Replace" and isinstance(d.get("pattern"), dict) and d.get("content") == " "),
            None,
        )
        self.cleanup = bool(config.get("clean_up_tokenization_spaces", False)) and (
            (spec.get("model") or {}).get("type") != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        )

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.cleanup else text

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token as the decoder would emit them mid-text (no sentencepiece start strip)."""
        if token_id in self.added:
            return self.added[token_id].content.encode("utf-8")
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is out of range")
        if self.byte_level:
            table = _byte_level_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        if self.byte_fallback and (m := _BYTE_FALLBACK.match(piece)):
            return bytes([int(m.group(1), 16)])
        if self.metaspace:
            return piece.replace(self.metaspace, " ").encode("utf-8")
        return self.tok.decode([token_id], skip_special_tokens=False).encode("utf-8")


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (for WordPiece-style models that opt into it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file ("<base64 token> <rank>" per line). Same format as
    tiktoken.load.load_tiktoken_bpe, read directly because that helper caches files in a temp
    directory keyed by path, which would serve a stale vocabulary if a file at that path changes."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not a tiktoken BPE line") from e
    return ranks


class _TiktokenBackend:
    """A tiktoken BPE file plus special tokens from tokenizer_config.json."""

    def __init__(self, bpe_file: Path, config: dict, pattern: str):
        import tiktoken

        ranks = read_tiktoken_ranks(bpe_file)
        specials: dict[str, int] = {}
        self.skippable: set[int] = set()
        for key, tok in (config.get("added_tokens_decoder") or {}).items():
            content = _token_content(tok)
            if content is None:
                continue
            specials[content] = int(key)
            if not isinstance(tok, dict) or tok.get("special", True):
                self.skippable.add(int(key))
        self.enc = tiktoken.Encoding(
            name=bpe_file.stem, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
        )
        self.ranks = ranks
        self.specials = specials
        self.id_to_special = {i: s for s, i in specials.items()}
        self.ranks_inv = {i: b for b, i in ranks.items()}
        self.vocab_size = max([*ranks.values(), *specials.values()]) + 1

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # Special tokens written in the text are recognised, as added tokens are in transformers.
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.skippable]
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in self.specials:
            return self.specials[token]
        return self.ranks.get(token.encode("utf-8"))

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.id_to_special:
            return self.id_to_special[token_id].encode("utf-8")
        try:
            return self.ranks_inv[token_id]
        except KeyError:
            raise ValueError(f"token id {token_id} is out of range") from None


def _find_tiktoken_file(path: Path) -> Path | None:
    model = path / "tokenizer.model"
    if model.is_file():
        head = model.read_bytes()[:256].split(b"\n", 1)[0].split()
        if len(head) == 2 and head[1].isdigit():  # not a sentencepiece protobuf
            return model
    found = sorted(path.glob("*.tiktoken"))
    return found[0] if found else None


def _load_chat_template(path: Path, config: dict) -> str | None:
    """The default template, looked up in transformers' order: chat_template.jinja (and the
    chat_templates/ folder) override tokenizer_config.json's "chat_template" (a string or a list of
    {"name", "template"})."""
    templates: dict[str, str] = {}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_templates").is_dir():
        for f in sorted((path / "chat_templates").glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
    if not templates:
        raw = config.get("chat_template")
        if isinstance(raw, str):
            return raw
        if isinstance(raw, list):
            templates = {t["name"]: t["template"] for t in raw}
        elif isinstance(raw, dict):
            templates = dict(raw)
    return templates.get("default")


def _read_generation_eos(path: Path) -> set[int]:
    value = _read_json(path / "generation_config.json").get("eos_token_id")
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list) else {int(value)}


@dataclass
class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, special ids and chat template. Build with
    `Tokenizer.from_pretrained(dir)`."""

    backend: _Backend
    special_tokens: dict[str, str]  # named special tokens (bos_token, ...) as strings
    chat_template: str | None
    add_bos: bool
    add_eos: bool = False
    eos_token_ids: set[int] = field(default_factory=set)
    _text_cache: dict[int, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, pattern: str = LLAMA3_PATTERN) -> Tokenizer:
        """Load from a checkpoint directory: tokenizer.json if present, else a tiktoken BPE file
        (`tokenizer.model` in tiktoken format or `*.tiktoken`, pre-tokenized with `pattern`)."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        for key, value in _read_json(path / "special_tokens_map.json").items():
            config.setdefault(key, value)  # legacy file: tokenizer_config wins
        special = {n: c for n in NAMED_SPECIAL_TOKENS if (c := _token_content(config.get(n))) is not None}
        if (path / "tokenizer.json").is_file():
            backend: _Backend = _HFBackend(path, config)
            probe = backend.encode("", add_special_tokens=True)
            bos = backend.token_to_id(special["bos_token"]) if "bos_token" in special else None
            eos = backend.token_to_id(special["eos_token"]) if "eos_token" in special else None
            add_bos = bos is not None and probe[:1] == [bos]
            add_eos = eos is not None and probe[-1:] == [eos]
        elif (bpe := _find_tiktoken_file(path)) is not None:
            backend = _TiktokenBackend(bpe, config, pattern)
            add_bos = bool(config.get("add_bos_token", False)) and "bos_token" in special
            add_eos = bool(config.get("add_eos_token", False)) and "eos_token" in special
        else:
            raise ValueError(
                f"{path}: no tokenizer found (expected tokenizer.json, or a tiktoken BPE file: "
                "tokenizer.model with '<base64> <rank>' lines or *.tiktoken)"
            )
        tok = cls(backend=backend, special_tokens=special, chat_template=_load_chat_template(path, config),
                  add_bos=add_bos, add_eos=add_eos)
        eos_ids = _read_generation_eos(path)
        if tok.eos_token_id is not None:
            eos_ids.add(tok.eos_token_id)
        tok.eos_token_ids = eos_ids
        return tok

    # ---- ids ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the bound for valid prompt ids)."""
        return self.backend.vocab_size

    def _id_of(self, name: str) -> int | None:
        content = self.special_tokens.get(name)
        return None if content is None else self.backend.token_to_id(content)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of("eos_token")

    # ---- text ---------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens)
        if add_special_tokens and isinstance(self.backend, _TiktokenBackend):
            # tokenizer.json's post-processor already did this for the HF backend.
            ids = ([self.bos_token_id] if self.add_bos else []) + ids + ([self.eos_token_id] if self.add_eos else [])
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (the OpenAI logprobs `bytes` field)."""
        return self.backend.token_bytes(token_id)

    def token_text(self, token_id: int) -> str:
        """The token as text; a token that is not valid UTF-8 on its own (part of a character)
        becomes OpenAI's "bytes:\\xNN..." form."""
        text = self._text_cache.get(token_id)
        if text is None:
            raw = self.token_bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._text_cache[token_id] = text
        return text

    # ---- chat ---------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render `messages` with the model's template exactly as transformers does (same sandboxed
        jinja environment and variables). Template errors become ValueError."""
        if self.chat_template is None:
            raise ValueError("model has no chat template")
        import jinja2
        from transformers.utils.chat_template_utils import render_jinja_template

        # transformers drops None-valued keys first (APIs send content=None, which templates mishandle).
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        tools = extra.pop("tools", None)
        documents = extra.pop("documents", None)
        try:
            rendered, _ = render_jinja_template(
                conversations=[chat],
                tools=tools,
                documents=documents,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **extra},
            )
        except jinja2.TemplateError as e:
            raise ValueError(e.message or str(e)) from e
        except TypeError as e:  # a message that is not a dict
            raise ValueError(str(e)) from e
        return rendered[0]

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """Render then encode without adding special tokens: the template writes BOS itself
        (as transformers' apply_chat_template(tokenize=True) does)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra),
                           add_special_tokens=False)
