"""Our forward pass against transformers: prefill and decode logits for every supported shape."""
from __future__ import annotations

import pytest
import torch

from loragate.engine.kv_cache import KVCache, KVCacheSpec
from loragate.engine.model.attention import AttentionMetadata, PrefillChunk
from loragate.engine.model.config import ModelConfig, UnsupportedModelError
from loragate.engine.model.llama import ForwardBatch, LlamaModel
from loragate.engine.model.loader import fused_weights, read_tensors
from loragate.kernels.native import BACKEND_ENV
from loragate.testing import SHAPES

from native_marks import CPU_KERNEL_BACKENDS

SHAPE_NAMES = list(SHAPES)


def load_ours(path) -> tuple[ModelConfig, LlamaModel]:
    cfg = ModelConfig.from_dir(path)
    w = fused_weights(cfg, read_tensors(path), torch.device("cpu"), torch.float32)
    return cfg, LlamaModel(cfg, w, torch.device("cpu"), torch.float32, max_positions=cfg.max_position_embeddings)


def hf_logits(path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def run_ours(cfg: ModelConfig, model: LlamaModel, ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Feed `ids` in chunks of the given sizes through the paged cache; logits of every position."""
    block = 4
    kv = KVCache(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block, torch.float32), 64, torch.device("cpu"))
    # a deliberately scrambled block table: pages need not be contiguous
    table = torch.tensor(kv.allocator.allocate(kv.blocks_needed(len(ids)))[::-1])
    outs, start = [], 0
    for n in chunks:
        pos = torch.arange(start, start + n)
        slots = table[pos // block] * block + pos % block
        if n == 1 and start > 0:
            ctx = torch.arange(start + 1)
            meta = AttentionMetadata(
                slot_mapping=slots,
                decode_rows=torch.tensor([0]),
                decode_kv_index=(table[ctx // block] * block + ctx % block).unsqueeze(0),
                decode_mask=torch.ones(1, 1, 1, start + 1, dtype=torch.bool),
                decode_lens=torch.tensor([start + 1]),
            )
        else:
            ctx = torch.arange(start + n)
            meta = AttentionMetadata(slot_mapping=slots, prefills=[
                PrefillChunk(0, n, table[ctx // block] * block + ctx % block, fresh=start == 0)])
        batch = ForwardBatch(torch.tensor(ids[start:start + n]), pos, meta, torch.arange(n))
        outs.append(model.forward(batch, kv.layers))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("shape", SHAPE_NAMES)
@pytest.mark.parametrize("cpu_kernels", CPU_KERNEL_BACKENDS)
def test_prefill_and_decode_logits_match_transformers(checkpoints, shape, cpu_kernels, monkeypatch):
    """Each CPU backend: the native kernels (attention, norms, RoPE, SwiGLU; need a C++ compiler, as
    CI has) and the torch path."""
    monkeypatch.setenv(BACKEND_ENV, cpu_kernels)
    path = checkpoints(shape)
    cfg, model = load_ours(path)
    ids = torch.randint(3, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_logits(path, ids)
    # whole prefill, chunked prefill (prefix in cache), then token-by-token decode
    for chunks in ([24], [10, 7, 7], [16] + [1] * 8):
        ours = run_ours(cfg, model, ids, chunks)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_loads(checkpoints):
    path = checkpoints("llama3", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    cfg, model = load_ours(path)
    ids = list(range(3, 20))
    torch.testing.assert_close(run_ours(cfg, model, ids, [len(ids)]), hf_logits(path, ids), atol=1e-4, rtol=1e-4)


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        ModelConfig.from_dir(tmp_path)


def test_pickled_checkpoint_is_refused(checkpoints, tmp_path):
    import shutil

    src = checkpoints("llama2")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickled"):
        read_tensors(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_linear_matches_plain_linear(dtype):
    """The CPU path reorders weights for oneDNN once; its products must equal F.linear's."""
    from loragate.engine.model.linear import Linear, prepack_supported

    if not prepack_supported(torch.device("cpu"), dtype):
        pytest.skip("oneDNN weight prepacking is not available for this dtype here")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 40, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    lin = Linear(w, b)
    assert lin.packed and lin.weight is None  # the plain copy is not kept
    for rows in (1, 7, 33):
        x = torch.randn(rows, 40, generator=g).to(dtype)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0, rtol=0)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w, b), **tol)
    x3 = torch.randn(2, 5, 40, generator=g).to(dtype)  # leading dims are kept
    assert lin(x3).shape == (2, 5, 96)
    assert Linear(w, prepack=False)(x3).shape == (2, 5, 96)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rms_norm_equals_torch_rms_norm(dtype):
    """The CPU path computes RMSNorm through LayerNorm of [x, -x]: it must equal rms_norm (bit for
    bit in bf16, to fp32 rounding in fp32), also for rows of very different scales and 3-D inputs."""
    from loragate.engine.model.norm import RMSNorm

    g = torch.Generator().manual_seed(0)
    w = (torch.rand(48, generator=g) + 0.5).to(dtype)
    x = torch.randn(2, 7, 48, generator=g) * torch.logspace(-3, 3, 7).view(1, 7, 1)
    x = x.to(dtype)
    ours = RMSNorm(w, 1e-6)(x)
    assert ours.shape == x.shape and ours.dtype == dtype
    tol = dict(atol=0, rtol=0) if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=2e-5)
    torch.testing.assert_close(ours, torch.nn.functional.rms_norm(x, (48,), w, 1e-6), **tol)
