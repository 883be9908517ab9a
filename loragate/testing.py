"""Builders of small random checkpoints, tokenizers and PEFT adapters for tests and benchmarks.

Nothing can be downloaded from a model hub here, so the real loading code is exercised on
checkpoints written by `transformers` and adapters written by `peft` from random weights.
`transformers`/`peft` are imported lazily: they are test and bench dependencies, not serving ones.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

# Plain turns render as `<|role|>\ncontent<|end|>\n`. Tool calling is Hermes style, which the
# server's default `--tool-call-parser hermes` reads back: a system turn names the tools and their
# arguments (`tools: get_weather(city, days)`; compact, as the demo's context is 256 tokens), an
# assistant turn that called tools writes `<tool_call>{"name", "arguments"}</tool_call>`, and tool
# results come back as a user turn in <tool_response> tags.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>\ntools: ' }}{% for tool in tools %}"
    "{% set fn = tool.function if tool.function is defined else tool %}"
    "{{ fn.name + '(' + ((fn.parameters or {}).properties or {}) | join(', ') + ')' }}"
    "{% if not loop.last %}{{ ', ' }}{% endif %}{% endfor %}{{ '<|end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}"
    "{{ '<|user|>\n<tool_response>\n' + message['content'] + '\n</tool_response><|end|>\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' }}{% if message['content'] is string %}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}{{ '<tool_call>' + {'name': call['function']['name'], "
    "'arguments': call['function']['arguments']} | tojson + '</tool_call>' }}{% endfor %}"
    "{{ '<|end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CORPUS_WORDS = (
    "the quick brown fox jumps over lazy dog hello world adapter model serve token batch "
    "customer request stream latency cache kernel llama rope attention matrix vector gateway "
    "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \u4e2d\u6587 \u0645\u0631\u062d\u0628\u0627 "
    "\U0001F600 \U0001F680 emoji data 0123456789 , . ! ? ; : ( ) [ ] { } - _ + = / \\ ' \""
).split()


def train_byte_level_bpe(lines: list[str], vocab_size: int, pre_tokenizer=None):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `lines` with SPECIAL_TOKENS; byte-level
    means any Unicode text round-trips. `pre_tokenizer` defaults to ByteLevel's own regex split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer and save it the way transformers does (tokenizer.json +
    tokenizer_config.json with a chat template). Byte-level means any Unicode text round-trips."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_CORPUS_WORDS) for _ in range(12)) for _ in range(2000)]
    tok = train_byte_level_bpe(lines, vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return out


@dataclass
class TinyShape:
    """A Llama-family shape small enough to run in milliseconds on the CPU."""

    arch: str = "llama"  # llama | mistral | qwen2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    extra: dict = field(default_factory=dict)


SHAPES: dict[str, TinyShape] = {
    "llama2": TinyShape(arch="llama", num_key_value_heads=4),
    "llama3": TinyShape(
        arch="llama",
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama_linear": TinyShape(arch="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "tinyllama": TinyShape(arch="llama", num_attention_heads=8, num_key_value_heads=2,
                           hidden_size=64, intermediate_size=160),
    "mistral": TinyShape(arch="mistral", num_key_value_heads=1),
    "qwen2": TinyShape(arch="qwen2", tie_word_embeddings=True),
}

SMOLLM_135M = TinyShape(
    arch="llama",
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
)


def hf_config(shape: TinyShape, vocab_size: int, dtype: str = "float32"):
    """The transformers config object for a shape (LlamaConfig, MistralConfig or Qwen2Config)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        dtype=dtype,
        **shape.extra,
    )
    if shape.head_dim is not None:
        common["head_dim"] = shape.head_dim
    if shape.rope_scaling is not None:
        common["rope_scaling"] = dict(shape.rope_scaling)
    if shape.arch == "llama":
        return LlamaConfig(**common)
    if shape.arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if shape.arch == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    raise ValueError(f"unknown arch {shape.arch}")


def build_checkpoint(
    out_dir: str | Path,
    shape: TinyShape | str = "llama3",
    dtype: str = "float32",
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: str | None = None,
    vocab_size: int = 512,
    model_vocab_size: int | None = None,
) -> Path:
    """Write a random Hugging Face checkpoint (config.json, safetensors, generation_config.json,
    tokenizer files) for `shape`. Weights are scaled up from the default init so that different
    prompts give clearly different greedy continuations."""
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(shape, str):
        shape = SHAPES[shape]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else build_tokenizer(out, vocab_size=vocab_size)
    if tokenizer_dir:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            src = tok_dir / name
            if src.exists():
                (out / name).write_bytes(src.read_bytes())
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    vocab = max(vocab, 8, model_vocab_size or 0)  # a larger embedding than the tokenizer needs is fine
    cfg = hf_config(shape, vocab_size=vocab, dtype=dtype)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 / p.shape[1] ** 0.5 * 4)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
            else:  # norms: stay near 1 so activations stay tame
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out), **kwargs)
    return out


DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    use_rslora: bool = False,
    scale: float = 1.0,
    dtype: str = "float32",
    **lora_kwargs,
) -> Path:
    """Write a PEFT LoRA adapter with random (non-zero) A and B for the checkpoint in `base_dir`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=use_rslora,
        **lora_kwargs,
    )
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                fan = p.shape[1]
                p.copy_(torch.randn(p.shape, generator=gen) * scale * 2.0 / fan**0.5)
    model = model.to(getattr(torch, dtype))
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2))


def free_port() -> int:
    """A port on 127.0.0.1 that is free now (the OS picks it; a server started next binds it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """A real `loragate serve` process on a free local port, for tests and scripts/soak.py.

    Its log goes to `log_path` (a file, so a chatty server can never block on a full pipe).
    `start()` waits (bounded) until /health answers 200; `stop()` sends SIGTERM and waits for the
    exit code; the context manager kills it if it is still running."""

    def __init__(self, args: list[str], log_path: str | Path, env: dict | None = None,
                 cwd: str | Path | None = None) -> None:
        self.port = free_port()
        self.args = [*args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.proc = None

    def start(self, timeout: float = 180.0) -> "ServeProcess":
        import os
        import subprocess
        import sys
        import time

        import httpx

        env = {**os.environ, **(self.env or {})}
        log = open(self.log_path, "w")  # noqa: SIM115 - the child keeps it open
        self.proc = subprocess.Popen([sys.executable, "-m", "loragate.cli", "serve", *self.args], stdout=log,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.cwd)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loragate serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"loragate serve did not become healthy in {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit code (the process is killed if it outlives `timeout`)."""
        import signal
        import subprocess

        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
