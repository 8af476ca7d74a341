"""Sparse convolution as a Triton implicit GEMM: forward, input gradient and weight gradient.

Dimension legend: N input rows, M output rows, K kernel offsets, C_in / C_out channels, T row tiles of BLOCK_M.

    forward   out[p]     = bias + Σ_k feats[map[p, k]] @ weight[k]          sparse_conv_fwd_kernel
    d_feats   d_feats[q] = Σ_k grad[mapᵀ[q, k]] @ weight[k]ᵀ                the same kernel on the transposed map
                                                                        (submanifold: on the map itself, offsets
                                                                        of the weight reversed)
    d_weight  d_w[k]     = Σ_{p: map[p, k] >= 0} feats[map[p, k]]ᵀ grad[p]  sparse_conv_wgrad_kernel

The forward kernel gathers each tile's input rows through the kernel map inside the kernel (no gathered copy in
memory), multiplies C_in tiles on the tensor cores and accumulates in fp32; every output row is written once, by one
program, so there are no atomics. Output rows are visited in the order of their neighbour mask (bit k set when
``map[p, k] >= 0``), so the rows of a tile share their active offsets and each tile loops only over the offsets
that some row of it uses (a mask-sorted implicit GEMM). The weight gradient is one launch over (chunk of output
rows, offset, channel tile): each program walks the rows of its chunk in ascending order, reading its offset's
column of the kernel map and masking rows without that neighbour (no pair lists: building them needs a nonzero, a
host sync, and 8 bytes per pair), and programs are launched chunk by chunk with the offsets fastest, so the grad
rows and neighbouring feats rows of a chunk come from HBM once and are reused from L2 by all K offsets (launched
offset by offset, every offset re-read both tensors from HBM). An extra slot per chunk sums grad for the bias
gradient while those rows are in L2. Programs write fp32 partial sums that are added in a fixed order:
deterministic, no atomics.

The kernels use only builtins of ``triton.language`` (no ``tl.cdiv``/``tl.zeros``, which are themselves jitted),
so they also run under ``TRITON_INTERPRET=1`` when triton was imported before that variable was set.

Limits: feats and grad rows must be contiguous; fp16, bf16 and fp32 (fp32 uses IEEE dots unless
``torch.backends.cuda.matmul.allow_tf32`` is on). Only imported when the ``triton`` backend is chosen.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import KernelMap


# Row counts change with every batch: not specialised on (÷16, == 1), or each new combination recompiles the kernel
# in the middle of training (seconds per step; they are only used in masks and loop bounds).
@triton.jit(do_not_specialize=["M"])
def sparse_conv_fwd_kernel(
    feats_ptr, map_ptr, order_ptr, tile_offsets_ptr, tile_counts_ptr, weight_ptr, bias_ptr, out_ptr,
    M, C_IN, C_OUT, K,
    stride_wk, stride_wi, stride_wo,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = (C_OUT + BLOCK_N - 1) // BLOCK_N
    # C_out tiles of one row tile are neighbours in launch order, so they share the gathered rows in L2.
    pid_m = pid // num_n
    pid_n = pid % num_n
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = slots < M
    rows = tl.load(order_ptr + slots, mask=row_ok, other=0).to(tl.int64)  # [BLOCK_M] output rows of this tile
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_OUT
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    num_active = tl.load(tile_counts_ptr + pid_m)
    num_c = (C_IN + BLOCK_K - 1) // BLOCK_K
    for it in range(num_active * num_c):
        j = it // num_c
        c0 = (it - j * num_c) * BLOCK_K
        k = tl.load(tile_offsets_ptr + pid_m * K + j)
        src = tl.load(map_ptr + rows * K + k, mask=row_ok, other=-1)  # [BLOCK_M] input rows, -1 = none
        ci = c0 + tl.arange(0, BLOCK_K)
        ci_ok = ci < C_IN
        a = tl.load(feats_ptr + src.to(tl.int64)[:, None] * C_IN + ci[None, :],
                    mask=(src >= 0)[:, None] & ci_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(weight_ptr + k * stride_wk + ci[:, None] * stride_wi + cols[None, :] * stride_wo,
                    mask=ci_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * C_OUT + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["M", "SPLIT", "ROWS"])
def sparse_conv_wgrad_kernel(
    feats_ptr, grad_ptr, map_ptr, partial_ptr, bias_partial_ptr,
    M, C_IN, C_OUT, K, NUM_SLOTS, SPLIT, ROWS,
    PRECISION: tl.constexpr, BIAS_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
):
    pid = tl.program_id(0)
    num_i = (C_IN + BLOCK_I - 1) // BLOCK_I
    num_o = (C_OUT + BLOCK_O - 1) // BLOCK_O
    # Launch order (row chunk s, offset slot k, channel tile) with the tile fastest, then the offset: the programs
    # in flight at any time share one chunk of output rows, so its grad rows, map rows and neighbouring feats rows
    # come from HBM once and are reused from L2 by every offset.
    t = pid % (num_i * num_o)
    slot = pid // (num_i * num_o)
    k = slot % NUM_SLOTS
    s = slot // NUM_SLOTS
    ci = (t // num_o) * BLOCK_I + tl.arange(0, BLOCK_I)
    co = (t % num_o) * BLOCK_O + tl.arange(0, BLOCK_O)
    ci_ok = ci < C_IN
    co_ok = co < C_OUT
    r0 = s * ROWS
    r1 = tl.minimum(r0 + ROWS, M)
    if k < K:
        # The chunk's output rows in ascending order; rows without a neighbour at offset k are masked out.
        acc = tl.full((BLOCK_I, BLOCK_O), 0.0, tl.float32)
        for p0 in range(r0, r1, BLOCK_P):
            p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
            q = tl.load(map_ptr + p * K + k, mask=p < r1, other=-1)  # [BLOCK_P] input rows, -1 = none
            ok = q >= 0
            a = tl.load(feats_ptr + q.to(tl.int64)[:, None] * C_IN + ci[None, :], mask=ok[:, None] & ci_ok[None, :],
                        other=0.0)  # [BLOCK_P, BLOCK_I] gathered input rows
            g = tl.load(grad_ptr + p[:, None] * C_OUT + co[None, :], mask=ok[:, None] & co_ok[None, :],
                        other=0.0)  # [BLOCK_P, BLOCK_O] output-gradient rows, ascending
            acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
        base = partial_ptr + (s * K + k).to(tl.int64) * C_IN * C_OUT
        tl.store(base + ci[:, None] * C_OUT + co[None, :], acc, mask=ci_ok[:, None] & co_ok[None, :])
    elif t // num_o == 0:
        # The extra slot (only launched with a bias): column sums of grad over the chunk's rows, as a dot with
        # ones (tl.sum is a jitted helper); the rows are hot in L2 from the offsets of the same chunk.
        ones = tl.full((16, BLOCK_P), 1.0, grad_ptr.dtype.element_ty)
        acc_b = tl.full((16, BLOCK_O), 0.0, tl.float32)
        for p0 in range(r0, r1, BLOCK_P):
            pr = p0 + tl.arange(0, BLOCK_P)
            g = tl.load(grad_ptr + pr.to(tl.int64)[:, None] * C_OUT + co[None, :],
                        mask=(pr < r1)[:, None] & co_ok[None, :], other=0.0)
            acc_b = tl.dot(ones, g, acc_b, input_precision=BIAS_PRECISION)  # every row holds the column sums
        first = tl.arange(0, 16) == 0
        tl.store(bias_partial_ptr + s * C_OUT + tl.arange(0, 16)[:, None] * 0 + co[None, :], acc_b,
                 mask=first[:, None] & co_ok[None, :])


# ---------------------------------------------------------------------------------------------- schedules


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    # The interpreter has no SMs; any count gives the same numbers, a small one keeps CPU tests quick.
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4


def fwd_config(c_in: int, c_out: int) -> dict[str, int]:
    """Tile sizes and launch settings of the forward kernel (measured on an H200, see bench_sparse_conv.py)."""
    block_n = _pow2_clamp(c_out, 16, 128)
    block_k = _pow2_clamp(c_in, 16, 64)
    if block_n <= 32:  # narrow: gather-bound, so many rows in flight per program
        return {"BLOCK_M": 256, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 8, "num_stages": 3}
    big = block_n >= 128 and block_k >= 64
    return {"BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": block_k,
            "num_warps": 8 if big else 4, "num_stages": 3 if big else 4}


def wgrad_config(c_in: int, c_out: int) -> dict[str, int]:
    """Tile sizes, launch settings and output rows per chunk (``CHUNK_ROWS``) of the weight-gradient kernel."""
    block_i = _pow2_clamp(c_in, 16, 128)
    block_o = _pow2_clamp(c_out, 16, 128)
    # Small tiles are gather-bound: long pair blocks; large ones: full-width tiles read each gathered row once.
    # Chunks are sized so the rows that the programs in flight sweep (about 4 SMs' worth of chunks per offset
    # set, both operands) stay well inside L2.
    small = block_i * block_o <= 64 * 64
    return {"BLOCK_P": 128 if small else 64, "BLOCK_I": block_i, "BLOCK_O": block_o,
            "num_warps": 8 if block_i * block_o >= 64 * 128 else 4, "num_stages": 3,
            "CHUNK_ROWS": 16384 if small else 4096}


# Cap on the fp32 partial sums of the weight gradient ([SPLIT, K, C_in, C_out]): their second pass reads them once.
_WGRAD_PARTIAL_BYTES = 64 << 20


def _wgrad_split(m: int, k_total: int, c_in: int, c_out: int, cfg: dict[str, int], sms: int) -> tuple[int, int]:
    """(number of output-row chunks, rows per chunk) of the weight gradient."""
    tiles = triton.cdiv(c_in, cfg["BLOCK_I"]) * triton.cdiv(c_out, cfg["BLOCK_O"])
    # Chunks of CHUNK_ROWS rows, but at least four programs per SM, no more partial bytes than the cap, and no
    # chunk shorter than a pair block.
    split = max(triton.cdiv(m, cfg["CHUNK_ROWS"]), triton.cdiv(4 * sms, k_total * tiles))
    split = min(split, _WGRAD_PARTIAL_BYTES // (4 * k_total * c_in * c_out), triton.cdiv(m, cfg["BLOCK_P"]))
    rows = triton.cdiv(m, max(split, 1))
    return triton.cdiv(m, rows), rows


def _row_order(kmap: KernelMap) -> torch.Tensor:
    """int32 [M] output rows sorted by neighbour mask (stable: spatial order kept among equal masks)."""
    def build() -> torch.Tensor:
        m, k_total = kmap.map.shape
        if k_total > 62:  # masks no longer fit an int64: keep the given order
            return torch.arange(m, dtype=torch.int32, device=kmap.map.device)
        bits = torch.pow(2, torch.arange(k_total, device=kmap.map.device, dtype=torch.int64))
        mask = ((kmap.map >= 0).long() * bits).sum(1)  # [M]
        return torch.argsort(mask, stable=True).to(torch.int32)
    return kmap.cached("triton_row_order", build)


def _tile_schedule(kmap: KernelMap, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row tile, its active offsets first: (int32 [T, K] offsets, int32 [T] number active)."""
    def build() -> tuple[torch.Tensor, torch.Tensor]:
        m, k_total = kmap.map.shape
        t = triton.cdiv(m, block_m)
        valid = torch.zeros(t * block_m, k_total, dtype=torch.bool, device=kmap.map.device)
        valid[:m] = kmap.map[_row_order(kmap).long()] >= 0
        active = valid.view(t, block_m, k_total).any(1)  # [T, K]
        offsets = torch.argsort((~active).to(torch.uint8), dim=1, stable=True).to(torch.int32)
        return offsets.contiguous(), active.sum(1).to(torch.int32)
    return kmap.cached(("triton_tiles", block_m), build)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _check_inputs(feats: torch.Tensor, kmap: KernelMap, weight: torch.Tensor) -> None:
    if feats.shape[0] != kmap.num_inputs:
        raise ValueError(f"expected feats with {kmap.num_inputs} rows (the kernel map's inputs), got {feats.shape[0]}")
    if weight.shape[0] != kmap.num_offsets or weight.shape[1] != feats.shape[1]:
        raise ValueError(f"expected weight [{kmap.num_offsets}, {feats.shape[1]}, C_out], got {tuple(weight.shape)}")
    if weight.dtype != feats.dtype:
        raise ValueError(f"expected weight in the feats dtype {feats.dtype}, got {weight.dtype}")


# ---------------------------------------------------------------------------------------------- launchers


def sparse_conv_fwd(feats: torch.Tensor, kmap: KernelMap, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``[M, C_out]`` = bias + Σ_k feats[map[:, k]] @ weight[k]; feats ``[N, C_in]``, weight ``[K, C_in, C_out]``."""
    _check_inputs(feats, kmap, weight)
    feats = feats.contiguous()
    m, c_in, c_out = kmap.num_outputs, weight.shape[1], weight.shape[2]
    out = torch.empty(m, c_out, dtype=feats.dtype, device=feats.device)
    if m == 0:
        return out
    if feats.shape[0] == 0 or c_in == 0:
        return out.zero_() + (bias if bias is not None else 0)
    cfg = fwd_config(c_in, c_out)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    tile_offsets, tile_counts = _tile_schedule(kmap, block_m)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(c_out, block_n),)
    sparse_conv_fwd_kernel[grid](
        feats, kmap.map, _row_order(kmap), tile_offsets, tile_counts, weight,
        bias if bias is not None else out, out,
        m, c_in, c_out, kmap.num_offsets,
        weight.stride(0), weight.stride(1), weight.stride(2),
        HAS_BIAS=bias is not None, PRECISION=_precision(feats.dtype), **cfg,
    )
    return out


def sparse_conv_wgrad(feats: torch.Tensor, grad: torch.Tensor, kmap: KernelMap, *,
                      bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 weight gradient ``[K, C_in, C_out]`` = ``Σ_pairs feats[q]ᵀ grad[p]``, and with ``bias`` the fp32 bias
    gradient ``[C_out]`` = ``Σ_p grad[p]`` (else None).

    feats ``[N, C_in]``, grad ``[M, C_out]`` (the output gradient). One launch covers every offset; the programs
    of one chunk of output rows write fp32 partial sums that a second pass adds in a fixed order (deterministic).
    """
    feats, grad = feats.contiguous(), grad.contiguous()
    m, k_total, c_in, c_out = kmap.num_outputs, kmap.num_offsets, feats.shape[1], grad.shape[1]
    if m == 0 or c_out == 0 or c_in == 0 or feats.shape[0] == 0:
        d_bias = grad.sum(0, dtype=torch.float32) if bias else None
        return torch.zeros(k_total, c_in, c_out, dtype=torch.float32, device=feats.device), d_bias
    cfg = dict(wgrad_config(c_in, c_out))
    split, rows = _wgrad_split(m, k_total, c_in, c_out, cfg, _sm_count(feats.device))
    del cfg["CHUNK_ROWS"]
    partial = torch.empty(split, k_total, c_in, c_out, dtype=torch.float32, device=feats.device)
    bias_partial = torch.empty(split, c_out, dtype=torch.float32, device=feats.device) if bias else partial
    slots = k_total + 1 if bias else k_total  # the extra offset slot sums grad for the bias
    tiles = triton.cdiv(c_in, cfg["BLOCK_I"]) * triton.cdiv(c_out, cfg["BLOCK_O"])
    precision = _precision(feats.dtype)
    sparse_conv_wgrad_kernel[(split * slots * tiles,)](
        feats, grad, kmap.map, partial, bias_partial,
        m, c_in, c_out, k_total, slots, split, rows,
        PRECISION=precision, BIAS_PRECISION="ieee" if feats.dtype == torch.float32 else precision, **cfg,
    )
    # Fixed-order reductions over the chunks: deterministic.
    d_weight = partial[0] if split == 1 else partial.sum(0)
    d_bias = (bias_partial[0] if split == 1 else bias_partial.sum(0)) if bias else None
    return d_weight, d_bias


class SparseConvFunction(torch.autograd.Function):
    """Autograd of the implicit-GEMM sparse convolution (gradients for feats, weight and bias)."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                kmap: KernelMap) -> torch.Tensor:
        ctx.save_for_backward(feats, weight)
        ctx.kmap = kmap
        ctx.has_bias = bias is not None
        return sparse_conv_fwd(feats, kmap, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        feats, weight = ctx.saved_tensors
        kmap: KernelMap = ctx.kmap
        grad = grad.contiguous()
        d_feats = d_weight = d_bias = None
        if ctx.needs_input_grad[0] and kmap.symmetric:
            # mapᵀ[q, k] = map[q, K-1-k]: run on the forward's own map, row order and tile schedule, with the
            # offsets of the weight reversed (no transposed map in memory).
            d_feats = sparse_conv_fwd(grad, kmap, weight.flip(0).transpose(1, 2).contiguous())
        elif ctx.needs_input_grad[0]:
            d_feats = sparse_conv_fwd(grad, kmap.T, weight.transpose(1, 2).contiguous())
        want_bias = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:  # the bias gradient rides along in the weight-gradient launch
            d_weight, d_bias = sparse_conv_wgrad(feats, grad, kmap, bias=want_bias)
            d_weight = d_weight.to(weight.dtype)
        elif want_bias:
            d_bias = grad.sum(0, dtype=torch.float32)
        if d_bias is not None:
            d_bias = d_bias.to(weight.dtype)
        return d_feats, d_weight, d_bias, None


def sparse_conv_triton(feats: torch.Tensor, kmap: KernelMap, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable Triton sparse convolution; same contract as :func:`~.reference.sparse_conv_ref`."""
    return SparseConvFunction.apply(feats, weight, bias, kmap)
