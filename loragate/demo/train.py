"""Train the built-in demo: a tiny Llama that echoes, and one LoRA adapter per skill.

    python -m loragate.demo.train --out loragate/demo/weights --threads 2    # ~50 min on 2 cores

Why it is built this way:
- The tokenizer is byte-level with no merges: one token per character (per byte outside ASCII), so
  any text round-trips and every skill is a rule over characters the model can apply to words it
  never saw: copying, upper-casing and moving letters, never recalling a word from a vocabulary.
- The base learns `echo` when there is no system prompt, and also each skill when a system prompt
  names it. That is how real adapters work: the base has the ability, the adapter makes it the
  default. It also keeps the LoRA problem low-rank, so small adapters train in minutes.
- Prompts are rendered with the chat template exactly as the server will render them, and the loss
  is on the answer tokens (ending with the eos token, so generation stops) only.
- Phrases are English-like (see `tasks.random_word`); a stable hash keeps a tenth of all words out
  of training entirely, and the held-out evaluation is made of those words only.
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
    PhraseSpec,
    held_out,
    random_phrase,
)

# the same special tokens (via train_byte_level_bpe) and chat template as the test fixtures' tokenizer
from loragate.testing import CHAT_TEMPLATE, SPECIAL_TOKENS, train_byte_level_bpe

EOS_TOKEN = "<|end|>"
IGNORE = -100


@dataclass(frozen=True)
class ModelShape:
    """The base model's shape: deep enough for the character-level skills, a few MB in bf16."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class StageConfig:
    """One training run (the base or one adapter)."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 50
    weight_decay: float = 0.0
    # Steps of the final decay. 0: cosine decay over the whole run after warmup. Otherwise the rate
    # holds until the last `decay` steps (warmup-stable-decay), so a run can be resumed from any
    # stable-phase checkpoint and finished with a decay of its own.
    decay: int = 0


@dataclass(frozen=True)
class LoraSettings:
    """The adapters' PEFT settings."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the shipped weights; the seeds make a rerun reproduce them."""

    seed: int = 0
    shape: ModelShape = field(default_factory=ModelShape)
    # The shipped base: 8500 steps, warmup-stable-decay with a 1500-step decay. The skills come late
    # (held-out accuracy of the base with the skill named, on 40 phrases: reverse 38% / pig-latin
    # 38% at step 2000, 68/65% at 4000, 90/88% at 6000, 100/90% at 8000) and the decay phase
    # finishes them; the whole recipe, adapters and evaluation included, ran in 50 minutes on a
    # 2-core AVX-512 host (a 3000-step cosine base left reverse at 93% and pig-latin at 79%).
    base: StageConfig = field(default_factory=lambda: StageConfig(steps=8500, batch_size=32, lr=3e-3, warmup=200,
                                                                  decay=1500))
    adapter: StageConfig = field(default_factory=lambda: StageConfig(steps=200, batch_size=32, lr=2e-3, warmup=20))
    lora: LoraSettings = field(default_factory=LoraSettings)
    # The shipped adapters' steps: upper-casing is learned in a hundred, moving letters takes longer.
    skill_steps: dict[str, int] = field(default_factory=lambda: {
        "shout": 100, "reverse": 700, "title": 250, "pig-latin": 900})
    # Training phrases: mostly as long as the evaluated ones (1-6 words), a share up to 12 words so
    # longer messages work too.
    short: PhraseSpec = field(default_factory=lambda: PhraseSpec(1, 6, 80))
    long: PhraseSpec = field(default_factory=lambda: PhraseSpec(1, 12, 120))
    long_share: float = 0.3
    # Relative share of each kind of base example: plain echo, and each skill behind a system
    # prompt. The skills that move characters around get more, copying is learned on the way.
    mix: dict[str, float] = field(default_factory=lambda: {
        "echo": 1.0, "shout": 1.0, "reverse": 3.0, "sort": 3.0, "title": 1.0, "pig-latin": 4.0})
    eval_n: int = 200
    dtype: str = "bfloat16"  # storage dtype of the base weights


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(out_dir: Path):
    """A byte-level tokenizer with no merges (one token per byte) plus the chat's special tokens,
    saved with the chat template, and returned loaded through transformers."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # a vocabulary of exactly the 256 bytes and the special tokens leaves BPE nothing to merge
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = train_byte_level_bpe(["x"], 256 + len(SPECIAL_TOKENS), split)
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
        "model_max_length": 512,
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


class FastEncoder:
    """`encode_example` without rendering the template per example (which costs as much as a
    training step's worth of arithmetic): the template is rendered once per system prompt around a
    marker, and a message's bytes are spliced in. That is exact because the tokenizer has no merges;
    the constructor checks it against the real rendering anyway."""

    MARK = "\x00"

    def __init__(self, tok):
        self.tok = tok
        self.eos = tok.convert_tokens_to_ids(EOS_TOKEN)
        self.byte_ids = [tok.convert_tokens_to_ids(t) for t in _byte_tokens()]
        self.frames: dict[str | None, tuple[list[int], list[int]]] = {}
        for phrase in ("Hello, World!", "a", "x 2nd (b) C'est"):
            assert self(phrase, phrase) == encode_example(tok, phrase, phrase), "template splice mismatch"
            assert self(phrase, "y", "shout") == encode_example(tok, phrase, "y", "shout")

    def ids(self, text: str) -> list[int]:
        return [self.byte_ids[b] for b in text.encode()]

    def frame(self, system: str | None) -> tuple[list[int], list[int]]:
        if system not in self.frames:
            text = self.tok.apply_chat_template(prompt_messages(self.MARK, system), add_generation_prompt=True,
                                                tokenize=False)
            before, after = text.split(self.MARK)
            enc = lambda s: self.tok(s, add_special_tokens=False)["input_ids"]
            self.frames[system] = (enc(before), enc(after))
        return self.frames[system]

    def __call__(self, phrase: str, answer: str, system: str | None = None) -> tuple[list[int], list[int]]:
        before, after = self.frame(system)
        p_ids = before + self.ids(phrase) + after
        a_ids = self.ids(answer) + [self.eos]
        return p_ids + a_ids, [IGNORE] * len(p_ids) + a_ids


def _byte_tokens() -> list[str]:
    """The byte-level alphabet's token for each byte value (GPT-2's printable stand-ins)."""
    from tokenizers import pre_tokenizers

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, (chr(c) for c in cs)))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    return [table[b] for b in range(256)]


class ExampleStream:
    """Endless seeded stream of encoded training examples of one or several kinds, served in
    batches of similar length (so little of each batch is padding)."""

    POOL = 16  # batches drawn at once and cut by length

    def __init__(self, tok, kinds: list[tuple[str, float]], seed: int, cfg: TrainConfig):
        self.encode = FastEncoder(tok)
        self.kinds = [k for k, _ in kinds]
        self.weights = [w for _, w in kinds]
        self.rng = random.Random(seed)
        self.cfg = cfg
        self.ready: list[list[tuple[list[int], list[int]]]] = []

    def one(self) -> tuple[list[int], list[int]]:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        spec = self.cfg.long if self.rng.random() < self.cfg.long_share else self.cfg.short
        p = random_phrase(self.rng, spec, split="train")
        if kind.startswith("system:"):  # the base learning a skill when asked for it by name
            skill = kind.split(":", 1)[1]
            return self.encode(p, SKILL_FUNCS[skill](p), system=skill)
        return self.encode(p, SKILL_FUNCS[kind](p))

    def batch(self, n: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded batch. Right padding needs no attention mask: a causal model's real tokens
        never look at the pads after them, and pads carry no loss."""
        if not self.ready:
            pool = sorted((self.one() for _ in range(n * self.POOL)), key=lambda r: len(r[0]))
            self.ready = [pool[i:i + n] for i in range(0, len(pool), n)]
            self.rng.shuffle(self.ready)
        rows = self.ready.pop()
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
        return ids, labels


# ----------------------------------------------------------------------------- training


def lr_at(step: int, stage: StageConfig) -> float:
    """Linear warmup, (a constant rate,) then cosine decay to a tenth of the peak."""
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    begin = max(stage.warmup, stage.steps - stage.decay) if stage.decay else stage.warmup
    if step < begin:
        return stage.lr
    t = (step - begin) / max(1, stage.steps - begin)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def run_stage(model, stream: ExampleStream, stage: StageConfig, pad_id: int, label: str,
              on_eval=None, eval_every: int = 0, state_dir: Path | None = None,
              resume: Path | None = None) -> float:
    """Plain AdamW loop over the trainable parameters; returns the seconds it took.

    With `state_dir`, the whole training state (weights, optimizer, data stream, RNG) is saved at
    every evaluation, and `resume` continues from such a file: how the step count of the shipped
    recipe was chosen without training from scratch for every candidate.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.98))
    first = 0
    if resume is not None:
        state = torch.load(resume, weights_only=False)  # our own file, written below
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        stream.rng.setstate(state["stream_rng"])
        stream.ready = state["stream_ready"]
        torch.set_rng_state(state["torch_rng"])
        first = state["step"]
        print(f"[{label}] resumed at step {first} from {resume}", flush=True)
    model.train()
    start = time.time()
    running = None
    for step in range(first, stage.steps):
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
        if on_eval is not None and eval_every and step and step % eval_every == 0:
            model.eval()
            on_eval(step)
            model.train()
            if state_dir is not None:
                state_dir.mkdir(parents=True, exist_ok=True)
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                            "stream_rng": stream.rng.getstate(), "stream_ready": stream.ready,
                            "torch_rng": torch.get_rng_state()}, state_dir / f"state-{step + 1}.pt")
    model.eval()
    return time.time() - start


@torch.no_grad()
def generate_answers(model, tok, prompts: list[str], system: str | None = None,
                     max_new_tokens: int | None = None, batch_size: int = 64) -> list[str]:
    """Greedy answers for a list of user messages, batched with left padding."""
    answers: list[str] = []
    tok.padding_side = "left"
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        texts = [tok.apply_chat_template(prompt_messages(p, system), add_generation_prompt=True, tokenize=False)
                 for p in chunk]
        enc = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
        # every skill's answer is at most a few characters per word longer than the message
        limit = max_new_tokens or max(len(p.encode()) + 3 * len(p.split()) for p in chunk) + 8
        out = model.generate(
            **enc, do_sample=False, max_new_tokens=limit,
            eos_token_id=tok.convert_tokens_to_ids(EOS_TOKEN), pad_token_id=tok.pad_token_id,
        )
        answers += [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]
    return answers


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


def base_report(model, tok, n: int, show_misses: bool = False) -> dict[str, float]:
    """Held-out accuracy of the base: echo with no system prompt, each skill when named."""
    inputs = held_out(n)
    report = {}
    for s in (BASE_SKILL, *ADAPTER_SKILLS):
        answers = generate_answers(model, tok, inputs, system=None if s == BASE_SKILL else s)
        expected = [SKILL_FUNCS[s](p) for p in inputs]
        report[s] = sum(a == e for a, e in zip(answers, expected)) / len(inputs)
        if show_misses:
            for a, e in [(a, e) for a, e in zip(answers, expected) if a != e][:2]:
                print(f"    {s} miss: {a!r} (expected {e!r})", flush=True)
    return report


def train_base(cfg: TrainConfig, tok, out_dir: Path, eval_every: int = 0, checkpoints: Path | None = None,
               resume: Path | None = None) -> float:
    """Train and save the base; returns training seconds."""
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(cfg, tok))
    n = sum(p.numel() for p in model.parameters())
    print(f"base: {n / 1e6:.2f}M parameters, vocab {len(tok)}", flush=True)
    kinds = [(BASE_SKILL, cfg.mix[BASE_SKILL])] + [(f"system:{s}", cfg.mix[s]) for s in ADAPTER_SKILLS]
    stream = ExampleStream(tok, kinds, seed=cfg.seed, cfg=cfg)

    def on_eval(step: int) -> None:
        report = base_report(model, tok, 40, show_misses=True)
        print(f"[base] step {step} held-out: " + ", ".join(f"{k} {v:.0%}" for k, v in report.items()), flush=True)

    seconds = run_stage(model, stream, cfg.base, tok.pad_token_id, "base", on_eval, eval_every, checkpoints, resume)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
        do_sample=False,
        max_new_tokens=256,
    )
    report = base_report(model, tok, 100)
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
    stream = ExampleStream(tok, [(skill, 1.0)], seed=seed, cfg=cfg)
    stage = replace(cfg.adapter, steps=cfg.skill_steps.get(skill, cfg.adapter.steps))
    seconds = run_stage(model, stream, stage, tok.pad_token_id, skill)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    # PEFT records the absolute path of the base it was trained on; name the demo instead so the
    # shipped files do not depend on where they were built.
    conf_path = out_dir / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    conf["base_model_name_or_path"] = DEMO_MODEL_NAME
    conf["target_modules"] = sorted(conf["target_modules"])  # PEFT writes a set: same files every run
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
    ap.add_argument("--eval-every", type=int, default=0, help="report the base's held-out accuracy every N steps")
    ap.add_argument("--shape", default=None, metavar="H,I,L,HEADS,KV",
                    help="experiment: hidden, intermediate, layers, heads, kv heads (default: ModelShape)")
    ap.add_argument("--checkpoints", type=Path, default=None,
                    help="experiment: save the base's whole training state here at each evaluation")
    ap.add_argument("--resume", type=Path, default=None, help="experiment: continue the base from such a state file")
    ap.add_argument("--decay-steps", type=int, default=None, help="experiment: the base's final decay steps")
    ap.add_argument("--base-batch", type=int, default=None)
    ap.add_argument("--base-lr", type=float, default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    if args.base_steps is not None:
        cfg = replace(cfg, base=replace(cfg.base, steps=args.base_steps))
    if args.shape:
        h, i, n, heads, kv = (int(x) for x in args.shape.split(","))
        cfg = replace(cfg, shape=replace(cfg.shape, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                                         num_attention_heads=heads, num_key_value_heads=kv))
    if args.decay_steps is not None:
        cfg = replace(cfg, base=replace(cfg.base, decay=args.decay_steps))
    if args.base_batch is not None:
        cfg = replace(cfg, base=replace(cfg.base, batch_size=args.base_batch))
    if args.base_lr is not None:
        cfg = replace(cfg, base=replace(cfg.base, lr=args.base_lr))
    if args.adapter_steps is not None:  # a quick run: every adapter gets the same number of steps
        cfg = replace(cfg, adapter=replace(cfg.adapter, steps=args.adapter_steps), skill_steps={})

    base_dir = args.out / "base"
    timings: dict[str, float] = {}
    started = time.time()
    if args.skip_base:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(base_dir))
    else:
        if base_dir.exists():
            shutil.rmtree(base_dir)
        tok = build_tokenizer(base_dir)
        timings["base"] = train_base(cfg, tok, base_dir, args.eval_every, args.checkpoints, args.resume)
    for i, skill in enumerate(ADAPTER_SKILLS):
        if args.only is not None and skill not in args.only:
            continue
        out = args.out / "adapters" / skill
        if out.exists():
            shutil.rmtree(out)
        timings[skill] = train_adapter(cfg, tok, base_dir, skill, out, seed=cfg.seed + 100 + i)

    scores = evaluate(tok, args.out, cfg.eval_n)
    print(f"held-out exact match (greedy, {cfg.eval_n} phrases of 1-6 unseen words):")
    for skill, acc in scores.items():
        print(f"  {skill:10s} {acc:6.1%}")
    print("training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
          + f"; total with evaluation {time.time() - started:.0f} (CPU seconds used: {time.process_time():.0f})")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"weights on disk: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
