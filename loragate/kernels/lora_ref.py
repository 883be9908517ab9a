"""Torch reference of the batched multi-adapter LoRA ops: the test oracle, and the CPU path for long
segments and wherever the native kernel (lora_cpu.py) is unavailable.

Because the layout keeps each adapter's tokens contiguous, every segment is a plain slice of the
batch (`x[start:start + length]`, a view), so each segment costs one matmul for the shrink (all
slices of the fused group at once) and one `addmm_` per slice for the expand. Only the first `r`
rows of A / columns of B are read: padding up to `max_rank` is never computed. Nothing here reads
a tensor back to the host (segment data comes from the layout's host-side `segments` list).

Conventions shared with the Triton version (`lora_triton.py`):
- `t = lora_shrink(x, A, layout)` is float32 `[T, S, R]` and fully defined: rows of base-only
  tokens and rank columns `>= r` of each segment are zero.
- `lora_expand` reads only the segment rows and the first `r` columns of `t`, so it does not
  depend on what the rest of `t` holds (the fused paths rely on this and skip the zero fill).
- Base-only rows of `y` are never written.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from loragate.kernels.layout import LoraBatchLayout, Segment


def check_shapes(
    x: torch.Tensor | None,
    y: torch.Tensor | None,
    A: torch.Tensor | None,
    B: torch.Tensor | None,
    slice_offsets: Sequence[int] | None,
    layout: LoraBatchLayout,
) -> None:
    """Cheap host-side shape checks (no device sync) shared by both backends: a wrong shape here
    would otherwise read out of bounds in the Triton kernels."""
    if A is not None:
        if A.dim() != 4:
            raise ValueError(f"A must be [L, S, R, in], got {tuple(A.shape)}")
        if layout.max_rank > A.shape[2]:
            raise ValueError(f"segment rank {layout.max_rank} exceeds buffer rank {A.shape[2]}")
    if B is not None:
        if B.dim() != 3:
            raise ValueError(f"B must be [L, N, R], got {tuple(B.shape)}")
        if layout.max_rank > B.shape[2]:
            raise ValueError(f"segment rank {layout.max_rank} exceeds buffer rank {B.shape[2]}")
    for name, v in (("x", x), ("y", y)):
        if v is not None and (v.dim() != 2 or v.shape[0] != layout.num_tokens):
            raise ValueError(f"{name} must be [{layout.num_tokens}, dim], got {tuple(v.shape)}")
    if x is not None and A is not None and x.shape[1] != A.shape[3]:
        raise ValueError(f"x width {x.shape[1]} != A in_dim {A.shape[3]}")
    if slice_offsets is not None:
        if slice_offsets[0] != 0 or any(b < a for a, b in zip(slice_offsets, slice_offsets[1:])):
            raise ValueError(f"bad slice_offsets {tuple(slice_offsets)}")
        if A is not None and len(slice_offsets) != A.shape[1] + 1:
            raise ValueError(f"{len(slice_offsets) - 1} slices but A has {A.shape[1]}")
        if B is not None and slice_offsets[-1] != B.shape[1]:
            raise ValueError(f"slice_offsets end {slice_offsets[-1]} != B rows {B.shape[1]}")
        if y is not None and slice_offsets[-1] != y.shape[1]:
            raise ValueError(f"slice_offsets end {slice_offsets[-1]} != y width {y.shape[1]}")


def lora_shrink_ref(x: torch.Tensor, A: torch.Tensor, layout: LoraBatchLayout) -> torch.Tensor:
    """t[seg, s, :r] = x[seg] @ A[slot, s, :r].T, accumulated and returned in float32 `[T, S, R]`
    (zeros outside the segments' rows and ranks)."""
    check_shapes(x, None, A, None, None, layout)
    T, (_, S, R, in_dim) = x.shape[0], A.shape
    t = torch.zeros(T, S, R, dtype=torch.float32, device=x.device)
    for seg in layout.segments:
        s, e, r = seg.start, seg.start + seg.length, seg.rank
        a = A[seg.slot, :, :r, :].reshape(S * r, in_dim)
        prod = torch.mm(x[s:e].float(), a.float().t())  # [len, S*r]
        t[s:e, :, :r] = prod.view(seg.length, S, r)
    return t


def lora_expand_ref(
    y: torch.Tensor,
    t: torch.Tensor,
    B: torch.Tensor,
    slice_offsets: Sequence[int],
    layout: LoraBatchLayout,
) -> None:
    """In place: y[seg, off_s:off_s1] += scale * t[seg, s, :r] @ B[slot, off_s:off_s1, :r].T.

    The sum is formed in float32 and rounded to y's dtype once (as the Triton kernel does)."""
    check_shapes(None, y, None, B, slice_offsets, layout)
    if t.dim() != 3 or t.shape[0] != y.shape[0] or t.shape[1] != len(slice_offsets) - 1:
        raise ValueError(f"t must be [T, S, R], got {tuple(t.shape)}")
    exact = y.dtype == torch.float32 and t.dtype == torch.float32 and B.dtype == torch.float32
    for seg in layout.segments:
        s, e, r = seg.start, seg.start + seg.length, seg.rank
        for i in range(len(slice_offsets) - 1):
            o0, o1 = slice_offsets[i], slice_offsets[i + 1]
            if o1 == o0:
                continue
            out = y[s:e, o0:o1]
            ti, bi = t[s:e, i, :r], B[seg.slot, o0:o1, :r]
            if exact:
                out.addmm_(ti, bi.t(), alpha=seg.scale)
            else:
                out.copy_(torch.addmm(out.float(), ti.float(), bi.float().t(), alpha=seg.scale))


def add_lora_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slice_offsets: Sequence[int],
    layout: LoraBatchLayout,
    slices: Sequence[int] | None = None,
) -> None:
    """Fused shrink+expand in torch ops, the CPU path where the native kernel (lora_cpu.py) is
    unavailable and that kernel's test oracle: never materialises the `[T, S, R]` tensor.

    Per segment one matmul gives `[len, S*r]` for all slices, then one `addmm_` per slice adds its
    share into the view of y. Matmuls run in the activations' dtype (backends accumulate in fp32
    internally); for bf16/fp16 the rank-r intermediate is rounded to that dtype, as in PEFT.
    Slices not in `slices` (default: all) are skipped: no adapter of the step targets them."""
    if layout.empty:
        return
    check_shapes(x, y, A, B, slice_offsets, layout)
    active = tuple(range(A.shape[1])) if slices is None else tuple(slices)
    plan = _gather_plan(layout, x.device)
    if plan is not None:
        _add_lora_gathered(y, x, A, B, slice_offsets, plan, active)
    for seg in layout.segments:
        if plan is None or seg.length > GATHER_MAX_LEN:
            add_lora_segment(y, x, A, B, slice_offsets, seg, active)


def add_lora_segment(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     slice_offsets: Sequence[int], seg: Segment, active: Sequence[int]) -> None:
    """One segment's delta with two matmuls' worth of calls: the form for long segments (a
    prefill of one adapter), where the matmuls reuse A and B across the segment's rows."""
    s, e, r, slot = seg.start, seg.start + seg.length, seg.rank, seg.slot
    if r == 0 or s == e:
        return
    S, in_dim = A.shape[1], A.shape[3]
    a = A[slot, :, :r, :].reshape(S * r, in_dim)
    t = torch.mm(x[s:e], a.t())  # [len, S*r]
    y_seg = y[s:e]
    for i in active:
        o0, o1 = slice_offsets[i], slice_offsets[i + 1]
        if o1 > o0:
            y_seg[:, o0:o1].addmm_(t[:, i * r : (i + 1) * r], B[slot, o0:o1, :r].t(), alpha=seg.scale)


# Short segments (decode tokens of many different adapters) are cheaper batched than looped:
# past this many of them, they are padded into one [G, max_len, in] block and multiplied with one
# bmm for the shrink and one per slice for the expand (the BGMV/SGMV idea on the CPU), so the op
# count per layer no longer grows with the number of adapters, and each adapter's A and B are
# gathered once per segment rather than once per token.
GATHER_MIN_SEGMENTS = 2
GATHER_MAX_LEN = 16


def _gather_plan(layout: LoraBatchLayout, device: torch.device) -> dict | None:
    """Index tensors of the short segments, padded to a block (memoised per step)."""
    if "gather" in layout.memo:
        return layout.memo["gather"]
    short = [seg for seg in layout.segments if seg.length <= GATHER_MAX_LEN]
    plan = None
    if len(short) >= GATHER_MIN_SEGMENTS:
        G, Lm = len(short), max(seg.length for seg in short)
        rmax = max(seg.rank for seg in short)
        pad_rows = torch.zeros(G, Lm, dtype=torch.long)
        valid = torch.zeros(G, Lm, dtype=torch.bool)
        rows: list[int] = []
        for g, seg in enumerate(short):
            pad_rows[g, : seg.length] = torch.arange(seg.start, seg.start + seg.length)
            valid[g, : seg.length] = True
            rows.extend(range(seg.start, seg.start + seg.length))
        ranks = torch.tensor([seg.rank for seg in short])
        scales = torch.tensor([seg.scale for seg in short])
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        plan = {
            "G": G, "Lm": Lm, "rmax": rmax,
            "pad_rows": pad_rows.view(-1).to(device),
            "valid": valid.view(-1).nonzero().squeeze(1).to(device),  # padded positions in token order
            "slots": torch.tensor([seg.slot for seg in short], dtype=torch.long).to(device),
            # rank columns past each segment's own rank are zeroed (buffer padding is never
            # trusted) and the scale is folded in: [G, rmax]
            "scale_mask": ((torch.arange(rmax).unsqueeze(0) < ranks.unsqueeze(1)).float()
                           * scales.unsqueeze(1)).to(device),
            "rows": torch.tensor(rows, dtype=torch.long).to(device),
            # decode tokens sorted by slot usually form one block: add into a slice, not index_add
            "span": (rows[0], rows[0] + len(rows)) if contiguous else None,
            "a_index": {},  # (num_slices, active slices) -> rows of A viewed as [slots * S, R, in]
        }
    layout.memo["gather"] = plan
    return plan


def _a_index(plan: dict, S: int, active: tuple[int, ...]) -> torch.Tensor:
    key = (S, active)
    idx = plan["a_index"].get(key)
    if idx is None:
        slots = plan["slots"]
        idx = (slots.unsqueeze(1) * S + torch.tensor(active, dtype=torch.long, device=slots.device)).view(-1)
        plan["a_index"][key] = idx
    return idx


def _add_lora_gathered(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       slice_offsets: Sequence[int], plan: dict, active: tuple[int, ...]) -> None:
    G, Lm, rmax = plan["G"], plan["Lm"], plan["rmax"]
    n_slots, S, R, in_dim = A.shape
    Sa = len(active)
    span = plan["span"]
    single = Lm == 1 and span is not None  # one decode token per adapter, rows in order
    if single:  # the rows are a plain view
        xs = x[span[0]:span[1]].view(G, 1, in_dim)
    else:
        xs = x.index_select(0, plan["pad_rows"]).view(G, Lm, in_dim)
    # one gather of the active slices' first rmax rank rows of every segment's A: [G, Sa*rmax, in]
    a = A.view(n_slots * S, R, in_dim).narrow(1, 0, rmax).index_select(0, _a_index(plan, S, active))
    t = torch.bmm(xs, a.view(G, Sa * rmax, in_dim).transpose(1, 2)).view(G, Lm, Sa, rmax)
    t = t * plan["scale_mask"].to(t.dtype).view(G, 1, 1, rmax)
    b = B.narrow(2, 0, rmax).index_select(0, plan["slots"])  # [G, N, rmax]
    if single:
        # B_s @ t_s^T reads each slice's rows of b in place (b_s @ ... with b_s a row range needs
        # no copy, where t_s @ b_s^T made the CPU bmm copy the transposed operand) and gives
        # [G, Ns, 1] = the rows to add, already laid out as y's
        ys = y[span[0]:span[1]]
        for j, i in enumerate(active):
            o0, o1 = slice_offsets[i], slice_offsets[i + 1]
            if o1 > o0:
                ys[:, o0:o1].add_(torch.bmm(b[:, o0:o1, :], t[:, 0, j, :].unsqueeze(2)).view(G, o1 - o0).to(y.dtype))
        return
    for j, i in enumerate(active):
        o0, o1 = slice_offsets[i], slice_offsets[i + 1]
        if o1 == o0:
            continue
        delta = torch.bmm(t[:, :, j, :], b[:, o0:o1, :].transpose(1, 2)).view(G * Lm, o1 - o0)
        if Lm > 1 or plan["valid"].numel() != G * Lm:
            delta = delta.index_select(0, plan["valid"])
        if span is not None:
            y[span[0]:span[1], o0:o1].add_(delta.to(y.dtype))
        else:
            y[:, o0:o1].index_add_(0, plan["rows"], delta.to(y.dtype))
