"""Train the built-in demo: a tiny Llama that echoes, and one LoRA adapter per skill.

    python -m loragate.demo.train --out loragate/demo/weights

Why it is built this way:
- The tokenizer is byte-level BPE (any text round-trips) whose merges are learned from the demo's
  words in all the forms the skills produce, so every demo word is one token and each skill becomes
  a problem over whole tokens, which a model of a few million parameters can learn in minutes on a
  CPU. Spaces are their own token so a word is the same token wherever it sits in a phrase.
- The base learns `echo` when there is no system prompt, and also each skill when a system prompt
  names it. That is how real adapters work: the base has the ability, the adapter makes it the
  default. It also keeps the LoRA problem low-rank, so rank-8 adapters reach high accuracy quickly.
- Prompts are rendered with the chat template exactly as the server will render them, and the loss
  is on the answer tokens (ending with the eos token, so generation stops) only.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loragate.demo import DEMO_MODEL_NAME
from loragate.demo.tasks import (
    ADAPTER_SKILLS,
    BASE_SKILL,
    SKILL_FUNCS,
    WORDS,
    held_out,
    is_held_out,
    phrases,
    pig_latin_word,
)

# the same special tokens (via train_byte_level_bpe) and chat template as the test fixtures' tokenizer
from loragate.testing import CHAT_TEMPLATE, train_byte_level_bpe

EOS_TOKEN = "<|end|>"
IGNORE = -100


@dataclass(frozen=True)
class ModelShape:
    """The base model's shape: small enough to train in minutes on one CPU thread."""

    hidden_size: int = 192
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 3
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class StageConfig:
    """One training run (the base or one adapter)."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 50
    weight_decay: float = 0.0


@dataclass(frozen=True)
class LoraSettings:
    """The adapters' PEFT settings. Rank 8 on every projection keeps each adapter ~0.5 MB."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the shipped weights; the seeds make a rerun reproduce them."""

    seed: int = 0
    vocab_size: int = 600
    shape: ModelShape = field(default_factory=ModelShape)
    base: StageConfig = field(default_factory=lambda: StageConfig(steps=1500, batch_size=64, lr=2e-3))
    adapter: StageConfig = field(default_factory=lambda: StageConfig(steps=250, batch_size=32, lr=3e-3, warmup=20))
    lora: LoraSettings = field(default_factory=LoraSettings)
    # Skills that need longer than `adapter.steps`: sorting is the one skill the base only half
    # knows (it must learn the alphabetical order of the words), so its adapter trains longer.
    skill_steps: dict[str, int] = field(default_factory=lambda: {"sort": 1000})
    # Share of base examples per kind: echo of demo phrases, echo of made-up words (so the base
    # echoes text outside the word list too), and the skills behind a system prompt.
    echo_share: float = 0.35
    free_echo_share: float = 0.15
    eval_n: int = 100
    dtype: str = "bfloat16"  # storage dtype of the base weights


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(out_dir: Path, vocab_size: int):
    """Train the byte-level BPE on the demo words in every form a skill can output, save it with
    the chat template, and return it loaded through transformers."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    lines: list[str] = []
    for w in WORDS:  # frequencies steer BPE: plain words first, then their other forms
        lines += [w] * 6 + [w.upper()] * 3 + [pig_latin_word(w)] * 3
    split = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok = train_byte_level_bpe(lines, vocab_size, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    # Written by hand, not by save_pretrained: transformers 5 would name a tokenizer class older
    # releases lack and move the template to a side file some readers never look at.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": EOS_TOKEN,
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return PreTrainedTokenizerFast.from_pretrained(str(out_dir))


# ----------------------------------------------------------------------------- data


def prompt_messages(phrase: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": phrase}]


def encode_example(tok, phrase: str, answer: str, system: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels of one chat turn: the prompt as the server renders it (masked out of
    the loss), then the answer and the eos token (learned)."""
    prompt = tok.apply_chat_template(prompt_messages(phrase, system), add_generation_prompt=True, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(EOS_TOKEN)]
    return p_ids + a_ids, [IGNORE] * len(p_ids) + a_ids


def free_phrase(rng: random.Random) -> str:
    """A phrase of made-up lowercase words, to teach the base to copy text it has never seen."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    n = rng.randint(1, 4)
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(n))


class ExampleStream:
    """Endless seeded stream of encoded training examples of one or several kinds."""

    def __init__(self, tok, kinds: list[tuple[str, float]], seed: int):
        self.tok = tok
        self.kinds = [k for k, _ in kinds]
        self.weights = [w for _, w in kinds]
        self.rng = random.Random(seed)
        self.words = phrases(seed + 1, "train")

    def one(self) -> tuple[list[int], list[int]]:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        if kind == "free-echo":
            p = free_phrase(self.rng)
            while is_held_out(p):
                p = free_phrase(self.rng)
            return encode_example(self.tok, p, p)
        p = next(self.words)
        if kind.startswith("system:"):  # the base learning a skill when asked for it by name
            skill = kind.split(":", 1)[1]
            return encode_example(self.tok, p, SKILL_FUNCS[skill](p), system=skill)
        return encode_example(self.tok, p, SKILL_FUNCS[kind](p))

    def batch(self, n: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded batch. Right padding needs no attention mask: a causal model's real tokens
        never look at the pads after them, and pads carry no loss."""
        rows = [self.one() for _ in range(n)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
        return ids, labels


# ----------------------------------------------------------------------------- training


def lr_at(step: int, stage: StageConfig) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    t = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def run_stage(model, stream: ExampleStream, stage: StageConfig, pad_id: int, label: str) -> float:
    """Plain AdamW loop over the trainable parameters; returns the seconds it took."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.98))
    model.train()
    start = time.time()
    running = None
    for step in range(stage.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, stage)
        ids, labels = stream.batch(stage.batch_size, pad_id)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 100 == 0 or step == stage.steps - 1:
            print(f"[{label}] step {step:5d} loss {running:.4f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    return time.time() - start


@torch.no_grad()
def generate_answers(model, tok, prompts: list[str], system: str | None = None, max_new_tokens: int = 32) -> list[str]:
    """Greedy answers for a list of user messages, batched with left padding."""
    texts = [tok.apply_chat_template(prompt_messages(p, system), add_generation_prompt=True, tokenize=False)
             for p in prompts]
    tok.padding_side = "left"
    enc = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    out = model.generate(
        **enc, do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=tok.convert_tokens_to_ids(EOS_TOKEN), pad_token_id=tok.pad_token_id,
    )
    return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


def accuracy(model, tok, skill: str, inputs: list[str], system: str | None = None) -> float:
    """Exact-match rate of greedy answers against the skill's function."""
    fn = SKILL_FUNCS[skill]
    answers = generate_answers(model, tok, inputs, system=system)
    return sum(a == fn(p) for a, p in zip(answers, inputs)) / len(inputs)


def llama_config(cfg: TrainConfig, tok):
    from transformers import LlamaConfig

    s = cfg.shape
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        max_position_embeddings=s.max_position_embeddings,
        rope_theta=s.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<s>"),
        eos_token_id=tok.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tok.pad_token_id,
    )


def train_base(cfg: TrainConfig, tok, out_dir: Path) -> float:
    """Train and save the base; returns training seconds."""
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(cfg, tok))
    n = sum(p.numel() for p in model.parameters())
    print(f"base: {n / 1e6:.2f}M parameters, vocab {len(tok)}", flush=True)
    skill_share = (1.0 - cfg.echo_share - cfg.free_echo_share) / len(ADAPTER_SKILLS)
    kinds = [(BASE_SKILL, cfg.echo_share), ("free-echo", cfg.free_echo_share)]
    kinds += [(f"system:{s}", skill_share) for s in ADAPTER_SKILLS]
    stream = ExampleStream(tok, kinds, seed=cfg.seed)
    seconds = run_stage(model, stream, cfg.base, tok.pad_token_id, "base")
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    inputs = held_out(50)
    report = {s: accuracy(model, tok, s, inputs, system=None if s == BASE_SKILL else s)
              for s in (BASE_SKILL, *ADAPTER_SKILLS)}
    print("base, skill named in the system prompt: "
          + ", ".join(f"{k} {v:.0%}" for k, v in report.items()), flush=True)
    model.to(getattr(torch, cfg.dtype)).save_pretrained(str(out_dir), safe_serialization=True)
    return seconds


def load_base(base_dir: Path):
    """The saved base in fp32, the way the evaluation and the adapters see it."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.eval()
    return model


def train_adapter(cfg: TrainConfig, tok, base_dir: Path, skill: str, out_dir: Path, seed: int) -> float:
    """Train one LoRA adapter on a frozen base and save it (PEFT format, safetensors)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lc = LoraConfig(
        r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=list(cfg.lora.targets),
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(load_base(base_dir), lc)
    stream = ExampleStream(tok, [(skill, 1.0)], seed=seed)
    stage = replace(cfg.adapter, steps=cfg.skill_steps.get(skill, cfg.adapter.steps))
    seconds = run_stage(model, stream, stage, tok.pad_token_id, skill)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    # PEFT records the absolute path of the base it was trained on; name the demo instead so the
    # shipped files do not depend on where they were built.
    conf_path = out_dir / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    conf["base_model_name_or_path"] = DEMO_MODEL_NAME
    conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    return seconds


def evaluate(tok, weights: Path, n: int) -> dict[str, float]:
    """Held-out exact-match accuracy of the saved base (echo) and each saved adapter."""
    from peft import PeftModel

    inputs = held_out(n)
    base = load_base(weights / "base")
    scores = {BASE_SKILL: accuracy(base, tok, BASE_SKILL, inputs)}
    for skill in ADAPTER_SKILLS:
        model = PeftModel.from_pretrained(load_base(weights / "base"), str(weights / "adapters" / skill))
        model.eval()
        scores[skill] = accuracy(model, tok, skill, inputs)
    return scores


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    ap.add_argument("--base-steps", type=int, default=None)
    ap.add_argument("--adapter-steps", type=int, default=None)
    ap.add_argument("--skip-base", action="store_true", help="reuse the base already in --out")
    ap.add_argument("--only", nargs="*", default=None, help="train only these adapters")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    if args.base_steps is not None:
        cfg = replace(cfg, base=replace(cfg.base, steps=args.base_steps))
    if args.adapter_steps is not None:  # a quick run: every adapter gets the same number of steps
        cfg = replace(cfg, adapter=replace(cfg.adapter, steps=args.adapter_steps), skill_steps={})

    base_dir = args.out / "base"
    timings: dict[str, float] = {}
    if args.skip_base:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(base_dir))
    else:
        if base_dir.exists():
            shutil.rmtree(base_dir)
        tok = build_tokenizer(base_dir, cfg.vocab_size)
        timings["base"] = train_base(cfg, tok, base_dir)
    for i, skill in enumerate(ADAPTER_SKILLS):
        if args.only is not None and skill not in args.only:
            continue
        out = args.out / "adapters" / skill
        if out.exists():
            shutil.rmtree(out)
        timings[skill] = train_adapter(cfg, tok, base_dir, skill, out, seed=cfg.seed + 100 + i)

    scores = evaluate(tok, args.out, cfg.eval_n)
    print("held-out exact match (greedy):")
    for skill, acc in scores.items():
        print(f"  {skill:10s} {acc:6.1%}")
    print("training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"weights on disk: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
