"""The built-in demo: a tiny Llama trained to echo, plus LoRA adapters that each do one visible thing.

`loragate serve` with no flags serves these, so a newcomer sees adapters change the answer without
downloading anything. The weights ship inside the package (see pyproject's package data) and are
rebuilt by `python -m loragate.demo.train --out loragate/demo/weights`.

The model reads and writes one character per token, so it works on any English-like message
(letters, digits, punctuation, mixed case); e.g. "Hello, how are you?":
  base       -> "Hello, how are you?"           (echo)
  shout      -> "HELLO, HOW ARE YOU?"
  reverse    -> "you? are how Hello,"
  title      -> "Hello, How Are You?"
  pig-latin  -> "Ellohay, owhay areyay ouyay?"
`python -m loragate.demo.evaluate` measures each on phrases of words the training never saw.

This module imports nothing heavy (no torch), so the CLI can ask for paths cheaply.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loragate.demo.tasks import ADAPTER_SKILLS, BASE_SKILL, SKILL_FUNCS

DEMO_MODEL_NAME = "loragate-demo"
DEMO_DIR: Path = Path(__file__).resolve().parent / "weights"

# Adapter name (and the base's name, DEMO_MODEL_NAME) -> what a correct answer is.
SKILLS: dict[str, Callable[[str], str]] = {
    DEMO_MODEL_NAME: SKILL_FUNCS[BASE_SKILL],
    **{name: SKILL_FUNCS[name] for name in ADAPTER_SKILLS},
}


def demo_paths() -> tuple[Path, dict[str, Path]]:
    """The base model directory and {adapter name: adapter directory} of the shipped demo.

    Only adapters whose directory holds an adapter_config.json are listed, so a partial rebuild
    never hands the engine a half-written adapter. Raises FileNotFoundError when the base is
    missing (e.g. an install that dropped package data), with the command that rebuilds it.
    """
    base = DEMO_DIR / "base"
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"demo weights not found in {DEMO_DIR}; rebuild them with "
            "`python -m loragate.demo.train --out loragate/demo/weights`"
        )
    adapters_dir = DEMO_DIR / "adapters"
    adapters = {
        name: adapters_dir / name
        for name in ADAPTER_SKILLS
        if (adapters_dir / name / "adapter_config.json").is_file()
    }
    return base, adapters


__all__ = ["DEMO_DIR", "DEMO_MODEL_NAME", "SKILLS", "demo_paths"]
