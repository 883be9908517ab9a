"""The demo's skills: pure string functions plus a seeded generator of English-like phrases.

The skills are chosen so that a person can check an answer at a glance and a model of a few million
parameters, reading one character per token, can learn them for any input: each is a rule over
characters and whitespace-separated words, never a lookup of known words. The same functions are
the test oracle, so "what the adapter should say" is defined in exactly one place.

Words are what `str.split()` returns; punctuation stays attached to its word ("Hello," is one word).
"""
from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

VOWELS = frozenset("aeiouAEIOU")
# a word = leading punctuation, a core that starts and ends with a letter or digit, trailing punctuation
_WORD = re.compile(r"^([^A-Za-z0-9]*)(.*?)([^A-Za-z0-9]*)$", re.DOTALL)


def split_word(word: str) -> tuple[str, str, str]:
    """("(", "Hello", "),") for "(Hello),": the punctuation around a word and its core."""
    lead, core, trail = _WORD.match(word).groups()
    return lead, core, trail


def echo(text: str) -> str:
    """The base model's skill: say the message back unchanged."""
    return text


def shout(text: str) -> str:
    """Upper-case the whole message (digits and punctuation unchanged)."""
    return text.upper()


def reverse(text: str) -> str:
    """Reverse the order of the words; each word (with its punctuation) is kept as it is."""
    return " ".join(reversed(text.split()))


def title_word(word: str) -> str:
    """Upper-case the first letter of a word's core ("(hello" -> "(Hello"); the rest is kept."""
    lead, core, trail = split_word(word)
    return lead + core[:1].upper() + core[1:] + trail


def title(text: str) -> str:
    """Title Case: every word starts with a capital letter."""
    return " ".join(title_word(w) for w in text.split())


def sort_key(word: str) -> tuple[str, str]:
    """Alphabetical order as a person means it: ignoring case (ties broken by code point)."""
    return word.lower(), word


def sort_words(text: str) -> str:
    """Sort the words alphabetically, ignoring case."""
    return " ".join(sorted(text.split(), key=sort_key))


def pig_latin_word(word: str) -> str:
    """Pig latin of one word.

    The rule applies to the word's core (punctuation around it stays where it is) when the core
    starts with an ASCII letter; anything else (a number, "3rd") is left alone:
    - a leading consonant cluster moves to the end and gains "ay": "string" -> "ingstray";
    - a word starting with a vowel (a, e, i, o, u) gains "yay": "apple" -> "appleyay";
    - a word with no vowel gains "ay": "myth" -> "mythay";
    - case follows the word: "Hello" -> "Ellohay", "NASA" -> "ASANAY".
    """
    lead, core, trail = split_word(word)
    if not core or not ("a" <= core[0].lower() <= "z"):
        return word
    i = next((k for k, ch in enumerate(core) if ch in VOWELS), None)
    if i == 0:
        out = core + "yay"
    elif i is None:
        out = core + "ay"
    else:
        out = core[i:] + core[:i] + "ay"
    letters = [ch for ch in core if ch.isalpha()]
    if len(letters) > 1 and all(ch.isupper() for ch in letters):
        out = out.upper()
    elif core[0].isupper() and i not in (0, None):
        # capitalized word: the new first letter takes the capital, the moved one loses it
        moved = len(core) - i
        out = out[0].upper() + out[1:moved] + out[moved].lower() + out[moved + 1:]
    return lead + out + trail


def pig_latin(text: str) -> str:
    """Pig latin of each word, word order kept."""
    return " ".join(pig_latin_word(w) for w in text.split())


# Skill name -> function. "echo" is what the base model does with no adapter.
SKILL_FUNCS: dict[str, Callable[[str], str]] = {
    "echo": echo,
    "shout": shout,
    "reverse": reverse,
    "sort": sort_words,
    "title": title,
    "pig-latin": pig_latin,
}
BASE_SKILL = "echo"
ADAPTER_SKILLS: tuple[str, ...] = ("shout", "reverse", "title", "pig-latin")


# ----------------------------------------------------------------------------- English-like words

# Syllables built from English spelling patterns; three of them make "lantern", "Brisket", "stoaming".
_ONSETS = ("", "", "", "b", "bl", "br", "c", "ch", "cl", "cr", "d", "dr", "f", "fl", "fr", "g", "gl", "gr",
           "h", "j", "k", "kn", "l", "m", "n", "p", "ph", "pl", "pr", "qu", "r", "s", "sc", "sh", "sk",
           "sl", "sm", "sn", "sp", "spr", "st", "str", "sw", "t", "th", "tr", "tw", "v", "w", "wh", "wr",
           "y", "z")
_NUCLEI = ("a", "a", "e", "e", "i", "i", "o", "o", "u", "ai", "au", "ay", "ea", "ee", "ei", "ie", "oa",
           "oi", "oo", "ou", "ow", "y")
_CODAS = ("", "", "", "", "b", "ck", "d", "ds", "ft", "g", "k", "l", "ld", "ll", "lt", "m", "mp", "n",
          "nd", "ng", "nk", "ns", "nt", "p", "r", "rd", "rk", "rm", "rn", "rs", "rt", "s", "sh", "sk",
          "sp", "ss", "st", "t", "th", "ts", "x", "ze")
# The words a first message is made of, so the demo's own examples are in-distribution.
COMMON_WORDS = tuple("""
    a an the I you he she it we they me my your our this that is are was be have has do does
    did not no yes and or but if so to of in on at by for with from up out about what who how
    why when where which hello hi hey thanks please good great new old big small long short
    day time year world people man woman child dog cat bird fish tree moon sun star river sea
    water fire wind rain snow city house home road car book word name work life love friend
    today now here there very just like make go see know get give take come think look want
    tell say ask find feel try call keep let put mean seem play run move live believe happy
""".split())
_TRAILING = (",", ",", ",", ".", ".", ".", "!", "!", "?", "?", ";", ":", "...", ")", "'", '"')
_LEADING = ("(", '"', "'", "[", "#", "@", "$")
_SUFFIXES = ("'s", "n't", "'ll", "'re", "'ve", "'d", "s", "ed", "ing", "-like")


def syllable_word(rng: random.Random) -> str:
    """A pronounceable made-up word of one to three syllables."""
    n = rng.choices((1, 2, 3), (6, 4, 1))[0]
    parts = []
    for k in range(n):  # inner syllables mostly open, as in "pa-per", "to-ma-to"
        coda = rng.choice(_CODAS) if k == n - 1 or rng.random() < 0.3 else ""
        parts.append(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + coda)
    return "".join(parts)


def number_word(rng: random.Random) -> str:
    """Digits as they appear in text: 7, 2024, 3.14, 3rd, 10km, v2, 1,000."""
    kind = rng.randrange(7)
    n = rng.randint(0, 10 ** rng.randint(1, 4) - 1)
    if kind == 0:
        return f"{rng.randint(0, 99)}.{rng.randint(0, 99)}"
    if kind == 1:
        return f"{n}{rng.choice(('st', 'nd', 'rd', 'th'))}"
    if kind == 2:
        return f"{n}{rng.choice(('km', 'kg', 'm', 'h', 'x', '%', 'GB', 'pm', 'am'))}"
    if kind == 3:
        return f"{rng.choice('vVx')}{rng.randint(0, 20)}"
    if kind == 4:
        return f"{rng.randint(1, 99)},{rng.randint(0, 999):03d}"
    return str(n)


def _case(rng: random.Random, word: str) -> str:
    r = rng.random()
    if r < 0.68:
        return word
    if r < 0.88:
        return word[:1].upper() + word[1:]
    if r < 0.96:
        return word.upper()
    return "".join(ch.upper() if rng.random() < 0.5 else ch for ch in word)


def random_word(rng: random.Random) -> str:
    """One English-like word as people type them: mostly lower case, sometimes Capitalized or
    UPPER, sometimes a number, with punctuation, apostrophes and suffixes now and then."""
    r = rng.random()
    if r < 0.07:
        word = number_word(rng)
    else:
        if r < 0.30:
            core = rng.choice(COMMON_WORDS)
        elif r < 0.36:
            core = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 8)))
        else:
            core = syllable_word(rng)
        if rng.random() < 0.08:
            core += rng.choice(_SUFFIXES)
        word = _case(rng, core)
    if rng.random() < 0.03:
        word = rng.choice(_LEADING) + word
    if rng.random() < 0.15:
        word += rng.choice(_TRAILING)
    return word


def word_key(word: str) -> str:
    """What identifies a word for the held-out split: its letters and digits, lower-cased, so
    "Moon," and "MOON" are the same word as "moon"."""
    return "".join(ch for ch in word.lower() if ch.isalnum())


def is_held_out(word: str, percent: int = 10) -> bool:
    """Whether a word belongs to the held-out split. A stable hash of the word (not the seed)
    decides, so training never sees a held-out word however the phrases are sampled."""
    digest = hashlib.sha256(word_key(word).encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


@dataclass(frozen=True)
class PhraseSpec:
    """What a random phrase looks like: 1 to max_words words, at most max_chars characters."""

    min_words: int = 1
    max_words: int = 6
    max_chars: int = 80


def random_phrase(rng: random.Random, spec: PhraseSpec = PhraseSpec(), split: str | None = None) -> str:
    """One phrase; with split="train" every word is outside the held-out split, with "test"
    every word is inside it, with None words are not filtered."""
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    while True:
        n = rng.randint(spec.min_words, spec.max_words)
        words: list[str] = []
        while len(words) < n:
            w = random_word(rng)
            if split is None or is_held_out(w) == (split == "test"):
                words.append(w)
        phrase = " ".join(words)
        if len(phrase) <= spec.max_chars:
            return phrase


def phrases(seed: int, split: str = "train", spec: PhraseSpec = PhraseSpec()) -> Iterator[str]:
    """An endless, seeded stream of phrases from one split ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(seed)
    while True:
        yield random_phrase(rng, spec, split)


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


def held_out(n: int, seed: int = 1234, spec: PhraseSpec = PhraseSpec()) -> list[str]:
    """The evaluation phrases: n distinct phrases of held-out words (1 to 6 words by default),
    the same for a given seed."""
    return take(phrases(seed, "test", spec), n)
