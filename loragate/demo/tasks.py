"""The demo's skills: pure string functions plus a seeded generator of short word phrases.

The skills are chosen so that a person can check an answer at a glance and a model of a few million
parameters can learn them from a few thousand examples: they operate on whole words from a fixed
list (word order, case, a per-word rewrite), never on arbitrary characters. The same functions are
the test oracle, so "what the adapter should say" is defined in exactly one place.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# Short, common, all-lowercase words, each with a vowel (so pig latin is well defined) and none
# starting with "qu" or "y" (the two usual pig-latin special cases we would rather not teach).
WORDS: tuple[str, ...] = tuple(
    """
    apple bird blue boat bread cat cloud cold dog door dream east fire fish flag frog glass
    gold green happy house ice iron jump king lamp lemon light moon night ocean orange paper
    plum rain red river road rock salt ship snow star stone sun tree water wind wolf
    """.split()
)

VOWELS = frozenset("aeiou")
MAX_CHARS = 30


def echo(text: str) -> str:
    """The base model's skill: say the message back unchanged."""
    return text


def shout(text: str) -> str:
    """Upper-case the whole message."""
    return text.upper()


def reverse(text: str) -> str:
    """Reverse the order of the words (not the characters: a tiny model cannot spell backwards)."""
    return " ".join(reversed(text.split()))


def sort_words(text: str) -> str:
    """Sort the words alphabetically."""
    return " ".join(sorted(text.split()))


def pig_latin_word(word: str) -> str:
    """Pig latin of one word: a leading consonant cluster moves to the end and gains "ay";
    a word starting with a vowel gains "yay"."""
    for i, ch in enumerate(word):
        if ch in VOWELS:
            return word + "yay" if i == 0 else word[i:] + word[:i] + "ay"
    return word + "ay"  # no vowel at all: nothing to move


def pig_latin(text: str) -> str:
    """Pig latin of each word, word order kept."""
    return " ".join(pig_latin_word(w) for w in text.split())


# Skill name -> function. "echo" is what the base model does with no adapter.
SKILL_FUNCS: dict[str, Callable[[str], str]] = {
    "echo": echo,
    "shout": shout,
    "reverse": reverse,
    "sort": sort_words,
    "pig-latin": pig_latin,
}
BASE_SKILL = "echo"
ADAPTER_SKILLS: tuple[str, ...] = ("shout", "reverse", "sort", "pig-latin")


def is_held_out(phrase: str, percent: int = 10) -> bool:
    """Whether a phrase belongs to the held-out split. A stable hash of the text (not the seed)
    decides, so training and evaluation can never share a phrase however they are sampled."""
    digest = hashlib.sha256(phrase.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


@dataclass(frozen=True)
class PhraseSpec:
    """What a random phrase looks like: distinct words from WORDS, short enough to read at once."""

    min_words: int = 2
    max_words: int = 5
    max_chars: int = MAX_CHARS


def random_phrase(rng: random.Random, spec: PhraseSpec = PhraseSpec()) -> str:
    """One phrase of distinct words (distinct so that sorting and reversing are unambiguous)."""
    while True:
        n = rng.randint(spec.min_words, spec.max_words)
        phrase = " ".join(rng.sample(WORDS, n))
        if len(phrase) <= spec.max_chars:
            return phrase


def phrases(seed: int, split: str = "train", spec: PhraseSpec = PhraseSpec()) -> Iterator[str]:
    """An endless, seeded stream of phrases from one split ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    want_test = split == "test"
    rng = random.Random(seed)
    while True:
        p = random_phrase(rng, spec)
        if is_held_out(p) == want_test:
            yield p


def take(it: Iterator[str], n: int, unique: bool = True) -> list[str]:
    """The first n phrases of a stream, optionally without repeats."""
    out: list[str] = []
    seen: set[str] = set()
    for p in it:
        if unique and p in seen:
            continue
        seen.add(p)
        out.append(p)
        if len(out) == n:
            break
    return out


def held_out(n: int, seed: int = 1234) -> list[str]:
    """The evaluation phrases: n distinct held-out phrases, the same for a given seed."""
    return take(phrases(seed, "test"), n)
