"""Triton block attention vs the torch reference: tiny ragged shapes (CPU interpreter), full sizes on GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit of the kernels

pytest.importorskip("triton")

from d3s2.ops.block_attn import (  # noqa: E402
    selection_attention,
    selection_attention_ref,
    window_attention,
    window_attention_ref,
)

from ._cases import ragged_offsets, random_selection  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n, hq, hkv, d, dtype=torch.float32, device=DEV, scale=1.0):
    q = (torch.randn(n, hq, d) * scale).to(device, dtype).requires_grad_()
    k = (torch.randn(n, hkv, d) * scale).to(device, dtype).requires_grad_()
    v = torch.randn(n, hkv, d).to(device, dtype).requires_grad_()
    return q, k, v


def _run(fn, q, k, v, do):
    q.grad = k.grad = v.grad = None
    o = fn(q, k, v)
    o.backward(do)
    return o.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()


def _rel(a, b):
    """Relative L2 error, with an absolute floor for (near-)zero references such as dq of one-key queries."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1.0)).item()


def _check_selection_and_window(q, k, v, off, idx, do):
    """Triton selection and window attention against the torch references: o, every gradient (finite, relative
    error < 1e-5) and the LSE (the same rows infinite, the rest within 1e-5)."""
    for ref_fn, tri_fn in (
            (lambda q, k, v: selection_attention_ref(q, k, v, off, idx, scale=0.3, return_lse=True),
             lambda q, k, v: selection_attention(q, k, v, off, idx, scale=0.3, backend="triton", return_lse=True)),
            (lambda q, k, v: window_attention_ref(q, k, v, off, return_lse=True),
             lambda q, k, v: window_attention(q, k, v, off, backend="triton", return_lse=True))):
        ref = _run(lambda q, k, v, f=ref_fn: f(q, k, v)[0], q, k, v, do)
        tri = _run(lambda q, k, v, f=tri_fn: f(q, k, v)[0], q, k, v, do)
        for name, a, b in zip(("o", "dq", "dk", "dv"), tri, ref):
            assert torch.isfinite(a).all(), name
            assert _rel(a, b) < 1e-5, (name, _rel(a, b))
        lse_t, lse_r = tri_fn(q, k, v)[1], ref_fn(q, k, v)[1]
        ok = torch.isfinite(lse_r)
        assert torch.equal(ok, torch.isfinite(lse_t))
        torch.testing.assert_close(lse_t[ok], lse_r[ok], rtol=1e-5, atol=1e-5)


# (block sizes, Hq, Hkv, D, S): one-token blocks, N not a multiple of tiles, S > number of blocks, G = 1, 2, 4.
CASES = [
    ([3, 1, 7, 5, 1, 9, 4], 4, 2, 16, 3),
    ([1, 1, 2, 1], 2, 2, 32, 6),
    ([20, 13, 1, 30, 3], 4, 1, 16, 2),
    ([5, 70, 2], 2, 1, 32, 2),
]


@pytest.mark.parametrize("sizes,hq,hkv,d,s", CASES)
def test_selection_triton_matches_reference(sizes, hq, hkv, d, s):
    off = ragged_offsets(sizes, DEV)
    n = int(off[-1])
    q, k, v = _inputs(n, hq, hkv, d)
    idx = random_selection(n, hkv, s, len(sizes), empty_frac=0.25).to(DEV)
    idx[0] = -1  # a query without blocks
    do = torch.randn(n, hq, d, device=DEV)
    ref = _run(lambda q, k, v: selection_attention_ref(q, k, v, off, idx, scale=0.3), q, k, v, do)
    tri = _run(lambda q, k, v: selection_attention(q, k, v, off, idx, scale=0.3, backend="triton"), q, k, v, do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), tri, ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))
    assert torch.all(tri[0][0] == 0)
    _, lse_t = selection_attention(q, k, v, off, idx, scale=0.3, backend="triton", return_lse=True)
    _, lse_r = selection_attention_ref(q, k, v, off, idx, scale=0.3, return_lse=True)
    torch.testing.assert_close(lse_t, lse_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes,hq,hkv,d", [([3, 1, 7, 5, 1, 9, 4], 4, 2, 16), ([1], 2, 1, 32),
                                             ([40, 2, 1, 17], 4, 4, 16)])
def test_window_triton_matches_reference(sizes, hq, hkv, d):
    _check_window(sizes, hq, hkv, d)


def _check_window(sizes: list[int], hq: int, hkv: int, d: int) -> tuple[torch.Tensor, ...]:
    """Window kernel vs reference on a ragged batch: output and every gradient; returns (q, k, v, offsets)."""
    off = ragged_offsets(sizes, DEV)
    n = int(off[-1])
    q, k, v = _inputs(n, hq, hkv, d)
    do = torch.randn(n, hq, d, device=DEV)
    ref = _run(lambda q, k, v: window_attention_ref(q, k, v, off), q, k, v, do)
    tri = _run(lambda q, k, v: window_attention(q, k, v, off, backend="triton"), q, k, v, do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), tri, ref):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))
    return q, k, v, off


def test_window_config_of_its_own(monkeypatch):
    """``WIN_FWD_CONFIG`` (16-row tiles, 16-key tail chunks) drives the window forward alone: output, LSE and every
    gradient against the reference, while the selection keeps ``FWD_CONFIG``."""
    from d3s2.ops.block_attn import triton as kernels

    monkeypatch.setattr(kernels, "WIN_FWD_CONFIG", {**kernels.FWD_CONFIG, "BLOCK_M": 16, "BLOCK_N": 32,
                                                    "TAIL_N": 16, "split": True})
    q, k, v, off = _check_window([40, 2, 1, 17, 33], 4, 2, 16)
    _, lse_t = window_attention(q, k, v, off, backend="triton", return_lse=True)
    _, lse_r = window_attention_ref(q, k, v, off, return_lse=True)
    torch.testing.assert_close(lse_t, lse_r, rtol=1e-5, atol=1e-5)
    # the window reads WIN_FWD_CONFIG and the selection does not: an invalid exp2 mode fails only the window
    monkeypatch.setattr(kernels, "WIN_FWD_CONFIG", {**kernels.FWD_CONFIG, "exp2": "invalid"})
    with pytest.raises(ValueError, match="exp2 mode"):
        window_attention(q, k, v, off, backend="triton")
    idx = random_selection(q.shape[0], k.shape[1], 2, len(off) - 1).to(DEV)
    selection_attention(q, k, v, off, idx, backend="triton")


def test_empty_block_and_backend_env(monkeypatch):
    off = ragged_offsets([4, 0, 3], DEV)  # block 1 is empty
    n = 7
    q, k, v = _inputs(n, 2, 1, 16)
    idx = torch.tensor([[1, -1]] * 3 + [[0, 1]] * 4, dtype=torch.int32, device=DEV)[:, None, :]
    monkeypatch.setenv("D3S2_BLOCK_ATTN_BACKEND", "triton")
    o = selection_attention(q, k, v, off, idx)
    ref = selection_attention_ref(q, k, v, off, idx)
    assert torch.all(o[:3] == 0)
    assert _rel(o, ref) < 1e-5


# GPU: full sizes, the flash-attention criterion against an fp32 reference of the same inputs ---------------


def _sorted_layout(n_blocks, mean, device, gen):
    sizes = torch.randint(1, 2 * mean, (n_blocks,), generator=gen).tolist()
    return ragged_offsets(sizes, device)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["selection", "window"])
@pytest.mark.parametrize("dtype,hq,hkv,d", [(torch.bfloat16, 32, 2, 32), (torch.float16, 32, 2, 32),
                                            (torch.float32, 32, 2, 32), (torch.bfloat16, 8, 8, 64),
                                            (torch.float16, 12, 4, 128)])
def test_gpu_error_at_most_twice_torch(dtype, op, hq, hkv, d):
    gen = torch.Generator().manual_seed(1)
    off = _sorted_layout(60, 100, "cuda", gen)
    n = int(off[-1])
    q, k, v = _inputs(n, hq, hkv, d, dtype=dtype, device="cuda")
    do = torch.randn(n, hq, d, device="cuda", dtype=dtype)
    if op == "selection":
        idx = random_selection(n, hkv, 8, 60, empty_frac=0.1, generator=gen).cuda()
        idx[:5] = -1
        fns = {b: (lambda q, k, v, b=b: selection_attention(q, k, v, off, idx, backend=b)) for b in ("torch", "triton")}
    else:
        fns = {b: (lambda q, k, v, b=b: window_attention(q, k, v, off, backend=b)) for b in ("torch", "triton")}
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = _run(fns["torch"], q32, k32, v32, do.float())
    pt = _run(fns["torch"], q, k, v, do)
    tri = _run(fns["triton"], q, k, v, do)
    atol = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}[dtype]
    for name, a, b, r in zip(("o", "dq", "dk", "dv"), tri, pt, ref):
        err = (a.float() - r).abs().max().item()
        err_pt = (b.float() - r).abs().max().item()
        assert err <= 2 * err_pt + atol, (name, err, err_pt)



@pytest.mark.parametrize("store", [torch.float16, torch.bfloat16], ids=["fp16-store", "bf16-store"])
def test_16bit_partials(store):
    """16-bit partial outputs (float16, or bfloat16 bits as used when |v| is beyond float16's range), float16
    inputs (the interpreter's bfloat16 dots are not IEEE-faithful; bfloat16 inputs run on the GPU tests).

    Each partial is a convex combination of value rows, so its storage error is at most one ulp of the storage
    type times max |v|, and so is that of their convex merge.
    """
    from d3s2.ops.block_attn import triton as kernels

    sizes, hq, hkv, d, s = CASES[0]
    off = ragged_offsets(sizes, DEV)
    n = int(off[-1])
    q, k, v = (t.detach().half() for t in _inputs(n, hq, hkv, d))
    idx = random_selection(n, hkv, s, len(sizes), empty_frac=0.25).to(DEV)
    plan = kernels.selection_plan(idx, len(sizes))
    o16, lse16 = kernels.block_attn_fwd(q, k, v, off, idx, plan, 0.3, partial_dtype=store)
    o32, lse32 = kernels.block_attn_fwd(q, k, v, off, idx, plan, 0.3, partial_dtype=torch.float32)
    ref = selection_attention_ref(q.double(), k.double(), v.double(), off, idx, scale=0.3)
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[store]
    err16, err32 = ((o.double() - ref).abs().max().item() for o in (o16, o32))
    assert err16 <= err32 + ulp * v.abs().max().item(), (err16, err32)
    if store == torch.bfloat16:  # coarser than the float16 output: the bfloat16 path really ran
        assert err16 > err32, (err16, err32)
    torch.testing.assert_close(lse16, lse32)


@pytest.mark.parametrize("dtype,v_max,want", [(torch.float16, 6e4, 0), (torch.bfloat16, 6e4, 0),
                                              (torch.bfloat16, 7e4, 1), (torch.bfloat16, float("inf"), 1)])
def test_partial_storage_flag(dtype, v_max, want):
    """bfloat16 values beyond float16's range switch the partials to bfloat16 bits, decided on the device (one
    reduction kernel); float16 values never need it, float32 inputs keep float32 partials."""
    from d3s2.ops.block_attn import triton as kernels

    v = torch.zeros(5, 2, 8, dtype=dtype, device=DEV)
    v[3, 1, 2] = -v_max
    buf, big, part16, check = kernels._partial_buffer(v, v, 7, 4, None)
    assert part16 and buf.dtype == torch.int16 and buf.shape == (7, 4, 8)
    assert check == (dtype == torch.bfloat16) and big.tolist() == [0]
    flag = torch.zeros(1, dtype=torch.int32, device=DEV)
    kernels._flag_big_values(v, flag)
    assert flag.tolist() == [want]
    _, big16, _, check16 = kernels._partial_buffer(v, v, 7, 4, torch.bfloat16)
    assert big16.tolist() == [1] and not check16
    buf32, _, part16, _ = kernels._partial_buffer(v, v, 7, 4, torch.float32)
    assert not part16 and buf32.dtype == torch.float32


def test_row_dot():
    from d3s2.ops.block_attn.triton import row_dot

    a, b = torch.randn(2, 37, 3, 20, device=DEV), torch.randn(2, 37, 3, 20, device=DEV)
    got = row_dot(a, b)
    assert got.shape == (2, 37, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, (a * b).sum(-1))
    assert row_dot(a[:, :0], b[:, :0]).shape == (2, 0, 3)


def test_bf16_dq_partials():
    """bfloat16 partial dQ (the default for bfloat16 inputs), forced here on float32 inputs (the interpreter's
    bfloat16 dots are not faithful): within a few bfloat16 roundings per slot of the float32-partial dQ."""
    from d3s2.ops.block_attn import triton as kernels

    sizes, hq, hkv, d, s = CASES[0]
    off = ragged_offsets(sizes, DEV)
    n = int(off[-1])
    q, k, v = (t.detach() for t in _inputs(n, hq, hkv, d))
    idx = random_selection(n, hkv, s, len(sizes), empty_frac=0.25).to(DEV)
    do = torch.randn(n, hq, d, device=DEV)
    plan = kernels.selection_plan(idx, len(sizes))
    o, lse = kernels.block_attn_fwd(q, k, v, off, idx, plan, 0.3)
    ref = kernels.block_attn_bwd(do, q, k, v, o, lse, off, idx, plan, 0.3)
    got = kernels.block_attn_bwd(do, q, k, v, o, lse, off, idx, plan, 0.3, dq_partial_dtype=torch.bfloat16)
    assert 0 < _rel(got[0], ref[0]) < s * 2.0**-8
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])  # dK/dV do not use the partials


@pytest.mark.parametrize("nb", [6, 20000], ids=["int16-keys", "int32-keys"])
def test_selection_plan_lists_match_a_bincount(nb):
    """The sync-free plan (searchsorted bounds) equals the bincount / exclusive-cumsum definition."""
    from d3s2.ops.block_attn import triton as kernels

    n, hkv, s = 37, 2, 4
    idx = random_selection(n, hkv, s, nb, empty_frac=0.25).to(DEV)
    idx[0, 0, 0] = nb + 3  # out of range: an empty slot, like -1
    plan = kernels.selection_plan(idx, nb)
    g = torch.arange(hkv, device=idx.device)[None, :, None]
    key = torch.where((idx >= 0) & (idx < nb), g * nb + idx, hkv * nb).flatten().long()
    counts = torch.bincount(key, minlength=hkv * nb + 1)[: hkv * nb]
    assert torch.equal(plan.list_count.long(), counts)
    assert torch.equal(plan.list_start.long(), torch.cumsum(counts, 0) - counts)
    assert torch.equal(plan.entry.long(), torch.sort(key, stable=True).indices)


@pytest.mark.parametrize("max_block_len", [None, 9], ids=["read-lengths", "given-bound"])
def test_dkdv_of_long_lists_in_chunks(max_block_len, monkeypatch):
    """dK/dV with long lists cut into chunks (float32 partials summed in chunk order): every gradient against the
    reference, within float32 rounding of the one-program-per-list backward, and run-to-run identical. Block 0 is
    selected by every query (the skew of a DiT at initialisation), so its lists split; the others do not."""
    from d3s2.ops.block_attn import triton as kernels

    sizes, hq, hkv, d, s = [5, 9, 3, 7, 1], 4, 2, 16, 3
    off = ragged_offsets(sizes, DEV)
    n = int(off[-1])
    q, k, v = _inputs(n, hq, hkv, d)
    idx = random_selection(n, hkv, s, len(sizes), empty_frac=0.1).to(DEV)
    idx[:, :, 0] = torch.where((idx == 0).any(-1), idx[:, :, 0], 0)  # block 0 in every (query, kv head) row
    do = torch.randn(n, hq, d, device=DEV)

    def grads(split_entries, max_chunks):
        monkeypatch.setattr(kernels, "DKDV_SPLIT", {"split_entries": split_entries, "max_chunks": max_chunks})
        return _run(lambda q, k, v: selection_attention(q, k, v, off, idx, scale=0.3, backend="triton",
                                                        max_block_len=max_block_len), q, k, v, do)

    whole = grads(4096, 16)  # no list longer than 4096 entries: one program per list
    split = grads(4, 5)  # lists of more than 4 entries in up to 5 chunks (block 0: 25 entries → 5 chunks)
    ref = _run(lambda q, k, v: selection_attention_ref(q, k, v, off, idx, scale=0.3), q, k, v, do)
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), split, whole, ref):
        assert _rel(a, c) < 1e-5, (name, _rel(a, c))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(split[2], whole[2])  # the split path ran (its sums round differently)
    again = grads(4, 5)
    assert all(torch.equal(a, b) for a, b in zip(again, split))


def test_tiles_match_their_definition():
    """``_tiles``: tile t belongs to the list whose chunks of ``per_tile`` entries cover it (idle tiles past the last
    one get len(counts)); int32 outputs for int32 and int64 counts."""
    from d3s2.ops.block_attn import triton as kernels

    counts = torch.tensor([0, 5, 3, 0, 0, 9, 1], dtype=torch.int32, device=DEV)
    per_tile, bound = 4, 12
    owner = [lst for lst, c in enumerate(counts.tolist()) for _ in range(-(-c // per_tile))]
    want_owner = owner + [len(counts)] * (bound - len(owner))
    want_cum = [0]
    for c in counts.tolist():
        want_cum.append(want_cum[-1] + -(-c // per_tile))
    for dtype in (torch.int32, torch.int64):
        got_owner, got_cum = kernels._tiles(counts.to(dtype), per_tile, bound)
        assert got_owner.dtype == got_cum.dtype == torch.int32
        assert got_owner.tolist() == want_owner and got_cum.tolist() == want_cum


@pytest.mark.parametrize("mode,split,case", [("poly", True, 3), ("mufu", False, 0)]
                         + ([("mix", False, 3), ("mix4", True, 0)] if DEV == "cuda" else []))
def test_forward_exp2_modes_and_split(mode, split, case, monkeypatch):
    """The forward with FMA-pipe exps ("mix*": inline asm, CUDA only) and with or without only the last key
    chunks masked (wide chunks, narrow tail): output, LSE and every gradient against the reference (the backward
    recomputes P from that LSE)."""
    from d3s2.ops.block_attn import triton as kernels

    # split: 32-key chunks unmasked, the rest in masked 16-key chunks
    monkeypatch.setattr(kernels, "FWD_CONFIG", {**kernels.FWD_CONFIG, "exp2": mode, "split": split,
                                                "BLOCK_N": 32 if split else 16, "TAIL_N": 16})
    sizes, hq, hkv, d, s = CASES[case]
    off = ragged_offsets(sizes, DEV)
    n = int(off[-1])
    q, k, v = _inputs(n, hq, hkv, d)
    idx = random_selection(n, hkv, s, len(sizes), empty_frac=0.25).to(DEV)
    do = torch.randn(n, hq, d, device=DEV)
    tol = 1e-5 if mode == "mufu" else 3e-4  # the polynomial's 8e-5 relative error per probability
    for ref_fn, tri_fn in (
            (lambda q, k, v: selection_attention_ref(q, k, v, off, idx, scale=0.3),
             lambda q, k, v: selection_attention(q, k, v, off, idx, scale=0.3, backend="triton")),
            (lambda q, k, v: window_attention_ref(q, k, v, off),
             lambda q, k, v: window_attention(q, k, v, off, backend="triton"))):
        ref = _run(ref_fn, q, k, v, do)
        tri = _run(tri_fn, q, k, v, do)
        for name, a, b in zip(("o", "dq", "dk", "dv"), tri, ref):
            assert torch.isfinite(a).all(), name
            assert _rel(a, b) < tol, (name, _rel(a, b))
    _, lse_t = selection_attention(q, k, v, off, idx, scale=0.3, backend="triton", return_lse=True)
    _, lse_r = selection_attention_ref(q, k, v, off, idx, scale=0.3, return_lse=True)
    torch.testing.assert_close(lse_t, lse_r, rtol=tol, atol=tol)


@pytest.mark.parametrize("shift,rowsum,case,far,masked", [
    ("bound", "reduce", 1, "", "last"), ("bound", "dot", 3, "", "last"), ("bound", "dot", 2, "far", "last"),
    ("first", "reduce", 2, "", "last"), ("first", "dot", 3, "", "last"), ("first", "reduce", 3, "over", "last"),
    ("first", "lanes", 2, "", "last"), ("bound", "lanes", 3, "", "last"), ("online", "lanes", 1, "", "last"),
    ("first", "lanes", 3, "over", "last"), ("first", "lanes", 2, "", "first"), ("first", "dot", 3, "", "first"),
    ("first", "reduce", 3, "over", "first")])
def test_forward_shift_modes(shift, rowsum, case, far, masked, monkeypatch):
    """The forward with a fixed per-row softmax shift (|q| · the block's largest key norm, or each row's largest
    logit of the block's first key chunk, that chunk whole or the block's masked remainder; no running max; row
    sums by per-row adds, per-lane partials or on the tensor cores) or the online softmax: output, LSE and every
    gradient against the reference, for the selection and the window.
    ``far``: one key per block of huge norm orthogonal to every query (the norm shift ~1000 binades above the
    logits, every probability would flush to 0); ``over``: the last key of each block, past the first 16-key chunk
    in blocks of 17 or more tokens, ~430 binades above every other logit (the first chunk's shift overflows): those
    tiles rerun with the online softmax (output and LSE only: at logits of 300 the float32 backward's own error,
    the reference's included, is ~1e-3 whatever the forward's shift)."""
    from d3s2.ops.block_attn import triton as kernels

    for name in ("FWD_CONFIG", "WIN_FWD_CONFIG"):
        monkeypatch.setattr(kernels, name, {**kernels.FWD_CONFIG, "shift": shift, "rowsum": rowsum,
                                            "BLOCK_N": 16, "TAIL_N": 16, "masked_chunk": masked})
    sizes, hq, hkv, d, s = CASES[case]
    off = ragged_offsets(sizes, DEV)
    n = int(off[-1])
    q, k, v = (t.detach() for t in _inputs(n, hq, hkv, d))
    if far == "far":
        q[..., 0] = 0.0
        first = off[:-1].long()
        k[first] = 0.0
        k[first, :, 0] = 1e3
    elif far == "over":
        q[..., 0] = 1.0
        last = off[1:].long() - 1
        k[last] = 0.0
        k[last, :, 0] = 1e3
        idx = random_selection(n, hkv, s, len(sizes), empty_frac=0.25).to(DEV)
        for ref_fn, tri_fn in (
                (lambda: selection_attention_ref(q, k, v, off, idx, scale=0.3, return_lse=True),
                 lambda: selection_attention(q, k, v, off, idx, scale=0.3, backend="triton", return_lse=True)),
                (lambda: window_attention_ref(q, k, v, off, return_lse=True),
                 lambda: window_attention(q, k, v, off, backend="triton", return_lse=True))):
            (o_r, lse_r), (o_t, lse_t) = ref_fn(), tri_fn()
            assert torch.isfinite(o_t).all() and _rel(o_t, o_r) < 1e-5
            ok = torch.isfinite(lse_r)
            assert torch.equal(ok, torch.isfinite(lse_t))
            torch.testing.assert_close(lse_t[ok], lse_r[ok], rtol=1e-5, atol=1e-5)
        return
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    idx = random_selection(n, hkv, s, len(sizes), empty_frac=0.25).to(DEV)
    do = torch.randn(n, hq, d, device=DEV)
    _check_selection_and_window(q, k, v, off, idx, do)


@pytest.mark.parametrize("key,value", [("rowsum", "lanez"), ("masked_chunk", "middle")])
def test_forward_config_values_are_checked(key, value, monkeypatch):
    """A misspelt row-sum form or masked-chunk place in the forward config fails with the values it accepts."""
    from d3s2.ops.block_attn import triton as kernels

    monkeypatch.setattr(kernels, "FWD_CONFIG", {**kernels.FWD_CONFIG, key: value})
    sizes, hq, hkv, d, s = CASES[1]
    off = ragged_offsets(sizes, DEV)
    n = int(off[-1])
    q, k, v = (t.detach() for t in _inputs(n, hq, hkv, d))
    idx = random_selection(n, hkv, s, len(sizes), empty_frac=0.25).to(DEV)
    with pytest.raises(ValueError, match=f"expected {key} .*got '{value}'"):
        selection_attention(q, k, v, off, idx, scale=0.3, backend="triton")


def test_register_cap_follows_the_head_dim(monkeypatch):
    """The window's register cap (64 at 8 warps) applies up to ``maxnreg_max_d`` only: ptxas cannot fit a 128-row
    D = 128 accumulator in 64 registers. Wide heads also drop to one warpgroup of 64 rows."""
    from d3s2.ops.block_attn import triton as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the cap is a CUDA launch option, never set under the interpreter
    cuda = torch.device("cuda")
    cfg = {"maxnreg": 64, "maxnreg_max_d": 32}
    assert kernels.max_registers(cfg, cuda, 32) == {"maxnreg": 64}
    assert kernels.max_registers(cfg, cuda, 128) == {}
    assert kernels.max_registers({"maxnreg": 96}, cuda, 128) == {"maxnreg": 96}
    assert kernels.max_registers(cfg, torch.device("cpu"), 32) == {}
    wide = kernels._fit({"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8}, None, 128)
    assert (wide["BLOCK_M"], wide["num_warps"]) == (64, 4)


def test_float16_keeps_the_online_shift(monkeypatch):
    """float16 probabilities underflow below 2^-24 under a fixed shift far above a row's largest logit (15x the torch
    error on an H200 at D = 128), so a "bound" config runs the online softmax for float16 inputs: the same bits."""
    from d3s2.ops.block_attn import triton as kernels

    sizes, hq, hkv, d, s = CASES[1]
    off = ragged_offsets(sizes, DEV)
    n = int(off[-1])
    q, k, v = (t.detach().half() for t in _inputs(n, hq, hkv, d))
    idx = random_selection(n, hkv, s, len(sizes), empty_frac=0.25).to(DEV)
    outs = {}
    for shift in ("online", "bound"):
        monkeypatch.setattr(kernels, "FWD_CONFIG", {**kernels.FWD_CONFIG, "shift": shift, "BLOCK_N": 16,
                                                    "TAIL_N": 16})
        outs[shift] = selection_attention(q, k, v, off, idx, scale=0.3, backend="triton")
    assert outs["online"].dtype == torch.float16 and torch.equal(outs["online"], outs["bound"])


@pytest.mark.parametrize("rows", [16])
def test_combine_unrolled_slots(rows, monkeypatch):
    """The partial combine with its slot loop unrolled (S a compile-time constant), forward merge and dQ sum: the
    same output and gradients as the reference."""
    from d3s2.ops.block_attn import triton as kernels

    monkeypatch.setattr(kernels, "COMBINE_CONFIG", {**kernels.COMBINE_CONFIG, "unroll": True, "rows": rows})
    sizes, hq, hkv, d, s = CASES[0]
    off = ragged_offsets(sizes, DEV)
    n = int(off[-1])
    q, k, v = _inputs(n, hq, hkv, d)
    idx = random_selection(n, hkv, s, len(sizes), empty_frac=0.25).to(DEV)
    do = torch.randn(n, hq, d, device=DEV)
    ref = _run(lambda q, k, v: selection_attention_ref(q, k, v, off, idx, scale=0.3), q, k, v, do)
    tri = _run(lambda q, k, v: selection_attention(q, k, v, off, idx, scale=0.3, backend="triton"), q, k, v, do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), tri, ref):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))


@pytest.mark.parametrize("hkv", [1, 2, 3])
def test_segment_max_norm(hkv):
    """Largest key norm per (segment, kv head), empty segments 0, segments longer than one kernel step."""
    from d3s2.ops.block_attn.triton import SEGMENT_NORM_TOKENS, segment_max_norm

    sizes = [3, 0, 2 * SEGMENT_NORM_TOKENS + 5, 1]
    off = ragged_offsets(sizes, DEV)
    k = torch.randn(int(off[-1]), hkv, 20, device=DEV)
    got = segment_max_norm(k, off)
    norms = k.norm(dim=-1)
    want = torch.stack([norms[a:b].amax(0) if b > a else torch.zeros(hkv, device=DEV)
                        for a, b in zip(off[:-1].tolist(), off[1:].tolist())])
    assert got.shape == (len(sizes), hkv)
    torch.testing.assert_close(got, want)


def test_max_registers_only_on_compiled_cuda(monkeypatch):
    """The register cap is a ptxas option: passed for compiled CUDA launches only, never to the interpreter."""
    from d3s2.ops.block_attn.triton import max_registers

    cfg = {"maxnreg": 96}
    assert max_registers(cfg, torch.device("cpu")) == {}
    assert max_registers({}, torch.device("cuda")) == {}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert max_registers(cfg, torch.device("cuda")) == {"maxnreg": 96}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert max_registers(cfg, torch.device("cuda")) == {}


@pytest.mark.parametrize("case,shift", [(0, "bound")])
def test_forward_tile_table(case, shift, monkeypatch):
    """The forward reading each tile's rows and key range from the per-tile table: output, LSE and every gradient
    against the reference, for the selection (empty slots, a query without blocks) and the window."""
    from d3s2.ops.block_attn import triton as kernels

    for name in ("FWD_CONFIG", "WIN_FWD_CONFIG"):
        # 16 entries per tile: lists of one and of several tiles
        monkeypatch.setattr(kernels, name, {**kernels.FWD_CONFIG, "tile_table": True, "shift": shift,
                                            "BLOCK_M": 32})
    sizes, hq, hkv, d, s = CASES[case]
    off = ragged_offsets(sizes, DEV)
    n = int(off[-1])
    q, k, v = _inputs(n, hq, hkv, d)
    idx = random_selection(n, hkv, s, len(sizes), empty_frac=0.25).to(DEV)
    idx[0] = -1
    do = torch.randn(n, hq, d, device=DEV)
    _check_selection_and_window(q, k, v, off, idx, do)
