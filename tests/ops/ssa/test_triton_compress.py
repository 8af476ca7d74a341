"""Triton kernels of the compressed branch (attention, scoring + top-k, backward) against the reference.

Without CUDA they run under TRITON_INTERPRET=1 on tiny ragged batches; with CUDA, the same cases run compiled.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (first import below)

pytest.importorskip("triton")

from d3s2.ops.ssa import triton_compress as tc  # noqa: E402
from d3s2.ops.ssa.reference import block_scores_ref, compressed_attention_ref, select_blocks_ref  # noqa: E402

from .helpers import layout_for, make_inputs, random_batch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    # sizes, res, m_cmp, m_slc, hq, hkv, d, topk
    ([37, 1, 70], 16, 2, 4, 4, 2, 8, 3),    # single-token sample; N not a multiple of the tile; 2 cmp per slc
    ([30, 2], 8, 1, 4, 2, 1, 16, 12),        # top-k larger than the block count, up to 64 cmp per slc
    ([20, 2], 8, 1, 1, 2, 1, 16, 4),         # blocks of one token
    ([33, 5], 16, 4, 4, 6, 2, 20, 5),        # m_cmp = m_slc, Hs = 3 (padded heads), D not a power of two
]


def assert_grads_match_reference(q, k_cmp, v_cmp, o, layout, scale, *, atol, rtol):
    """dq, dk_cmp, dv_cmp of the Triton compressed attention vs the float64 reference for one random dO."""
    do = torch.randn_like(o)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k_cmp, v_cmp))
    compressed_attention_ref(qr, kr, vr, layout)[0].backward(do.double())
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k_cmp, v_cmp))
    tc.compressed_attention(qt, kt, vt, layout, scale)[0].backward(do)
    for got, want in ((qt.grad, qr.grad), (kt.grad, kr.grad), (vt.grad, vr.grad)):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


def assert_topk_equivalent(idx, ref_idx, scores, layout, rtol=1e-4):
    """Same valid counts; every chosen block scores within rtol of the reference's worst chosen block."""
    assert torch.equal((idx >= 0).sum(-1), (ref_idx >= 0).sum(-1))
    cu, cs = layout.cu_seqlens.tolist(), layout.cu_slc.tolist()
    for b, sc in enumerate(scores):  # sc [Hkv, n_b, nbs_b]
        if cu[b + 1] == cu[b]:
            continue
        i, r = idx[cu[b]: cu[b + 1]].long(), ref_idx[cu[b]: cu[b + 1]].long()  # [n_b, Hkv, S]
        sc = sc.transpose(0, 1)  # [n_b, Hkv, nbs_b]
        got = torch.where(i >= 0, sc.gather(2, (i - cs[b]).clamp(min=0)), float("inf"))
        want = torch.where(r >= 0, sc.gather(2, (r - cs[b]).clamp(min=0)), float("inf"))
        worst = want.min(-1).values
        assert bool((got >= worst[..., None] * (1 - rtol) - 1e-7).all())
        # no duplicates among the chosen blocks
        srt = i.sort(-1).values
        assert bool(((srt[..., 1:] != srt[..., :-1]) | (srt[..., 1:] < 0)).all())


@pytest.mark.parametrize("sizes,res,m_cmp,m_slc,hq,hkv,d,topk", CASES)
def test_compressed_kernels_match_reference(sizes, res, m_cmp, m_slc, hq, hkv, d, topk):
    check_forward_topk_grads(sizes, res, m_cmp, m_slc, hq, hkv, d, topk, seed=0, o_tol=(2e-5, 1e-4),
                             lse_tol=(2e-5, 1e-5), topk_rtol=1e-4, grad_tol=(5e-5, 1e-4))


def check_forward_topk_grads(sizes, res, m_cmp, m_slc, hq, hkv, d, topk, *, seed, o_tol, lse_tol, topk_rtol,
                             grad_tol):
    """Compressed forward (output, LSE), top-k (equivalent up to near-ties) and every gradient against the
    float64 reference on a ragged batch; tolerances are (atol, rtol) pairs."""
    x = random_batch(sizes, res, seed=res + d + seed)
    layout = layout_for(x.to(DEV), m_cmp, m_slc, m_slc, 0)
    q, _, _, k_cmp, v_cmp, _ = make_inputs(x, layout, hq, hkv, d, seed=d + seed, device=DEV)
    scale = d**-0.5
    o, lse = tc.cmp_attention_fwd(q, k_cmp, v_cmp, layout, scale)
    o_ref, lse_ref = compressed_attention_ref(q.double(), k_cmp.double(), v_cmp.double(), layout)
    torch.testing.assert_close(o.double(), o_ref, atol=o_tol[0], rtol=o_tol[1])
    torch.testing.assert_close(lse.double(), lse_ref, atol=lse_tol[0], rtol=lse_tol[1])

    idx = tc.cmp_select_topk(q, k_cmp, lse, layout, topk, scale)
    ref_idx = select_blocks_ref(q.double(), k_cmp.double(), lse_ref, layout, topk=topk)
    assert idx.shape == ref_idx.shape and idx.dtype == torch.int32
    scores = [s.cpu() for s in block_scores_ref(q.double(), k_cmp.double(), lse_ref, layout)]
    assert_topk_equivalent(idx.cpu(), ref_idx.cpu(), scores, layout, rtol=topk_rtol)

    assert_grads_match_reference(q, k_cmp, v_cmp, o, layout, scale, atol=grad_tol[0], rtol=grad_tol[1])


def test_dkdv_deterministic_and_chunked(monkeypatch):
    x = random_batch([90, 3], 16, seed=7)
    layout = layout_for(x.to(DEV), 2, 4, 4, 0)
    q, _, _, k_cmp, v_cmp, _ = make_inputs(x, layout, 2, 1, 16, seed=1, device=DEV)
    o, lse = tc.cmp_attention_fwd(q, k_cmp, v_cmp, layout, 0.25)
    do = torch.randn_like(o)
    grads = [tc.cmp_attention_bwd(q, k_cmp, v_cmp, o, lse, do, layout, 0.25) for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    # a different chunking (more partial sums) gives the same gradient up to rounding
    monkeypatch.setitem(tc.CONFIG, "bwd_dkdv", {**tc.CONFIG["bwd_dkdv"], "programs_per_sm": 64})
    more = tc.cmp_attention_bwd(q, k_cmp, v_cmp, o, lse, do, layout, 0.25)
    for a, b in zip(grads[0], more):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,case", [("dot", 0), ("reshape", 0), ("reshape", 3)])
def test_topk_variants_half_precision(variant, case, monkeypatch):
    sizes, res, m_cmp, m_slc, hq, hkv, d, topk = CASES[case]
    for key in ("topk", "topk_seg"):
        monkeypatch.setitem(tc.CONFIG, key, {**tc.CONFIG[key], "variant": variant})
    x = random_batch(sizes, res, seed=res + d + 1)
    layout = layout_for(x.to(DEV), m_cmp, m_slc, m_slc, 0)
    q, _, _, k_cmp, v_cmp, _ = make_inputs(x, layout, hq, hkv, d, seed=d + 1, device=DEV, dtype=torch.float16)
    _, lse = compressed_attention_ref(q.double(), k_cmp.double(), v_cmp.double(), layout)
    idx = tc.cmp_select_topk(q, k_cmp, lse.float(), layout, topk, d**-0.5)
    ref_idx = select_blocks_ref(q.double(), k_cmp.double(), lse, layout, topk=topk)
    scores = [s.cpu() for s in block_scores_ref(q.double(), k_cmp.double(), lse, layout)]
    assert_topk_equivalent(idx.cpu(), ref_idx.cpu(), scores, layout, rtol=1e-3)


@pytest.mark.parametrize("case", [0, 2])
def test_topk_skip_matches_full_insertion(case, monkeypatch):
    """The float pre-test that skips quiet tiles picks exactly the blocks of the plain insertion."""
    sizes, res, m_cmp, m_slc, hq, hkv, d, topk = CASES[case]
    x = random_batch(sizes, res, seed=res + d + 3)
    layout = layout_for(x.to(DEV), m_cmp, m_slc, m_slc, 0)
    q, _, _, k_cmp, v_cmp, _ = make_inputs(x, layout, hq, hkv, d, seed=d + 3, device=DEV)
    _, lse = tc.cmp_attention_fwd(q, k_cmp, v_cmp, layout, d**-0.5)
    got = {}
    for skip in (True, False):
        for key in ("topk", "topk_seg"):
            monkeypatch.setitem(tc.CONFIG, key, {**tc.CONFIG[key], "variant": "dot", "skip": skip, "BLOCK_J": 16})
        got[skip] = tc.cmp_select_topk(q, k_cmp, lse, layout, topk, d**-0.5)
    assert torch.equal(got[True], got[False])


@pytest.mark.parametrize("mode", ["poly"] + (["mix"] if DEV == "cuda" else []))  # inline asm: CUDA only
@pytest.mark.parametrize("case", [0, 3])
def test_exp2_modes_match_reference(mode, case, monkeypatch):
    """Compressed forward (whole tiles unmasked) and top-k with FMA-pipe exps: outputs, LSE and every gradient (the
    backward recomputes the probabilities from that LSE) within the polynomial's 8e-5 relative error; the top-k
    equivalent up to near-ties of that size."""
    for key in ("fwd", "topk", "topk_seg"):
        monkeypatch.setitem(tc.CONFIG, key, {**tc.CONFIG[key], "exp2": mode})
    # whole tiles unmasked (16 compressed blocks per tile: samples of several tiles and of one partial tile)
    monkeypatch.setitem(tc.CONFIG, "fwd", {**tc.CONFIG["fwd"], "split": True, "BLOCK_C": 16})
    check_forward_topk_grads(*CASES[case], seed=5, o_tol=(3e-4, 3e-4), lse_tol=(2e-4, 1e-4), topk_rtol=5e-4,
                             grad_tol=(5e-4, 5e-4))


@pytest.mark.parametrize("case,dtype,m_split,lse_dot", [(0, torch.float32, 4, True), (0, torch.float16, 4, True),
                                                         (3, torch.float16, 4, True), (2, torch.float16, 2, False),
                                                         (2, torch.float16, 1, True)])
def test_topk_key32_split_rows_match_reference(case, dtype, m_split, lse_dot, monkeypatch):
    """int32 keys, the logit tile in row chunks, the LSE shift inside the logit matmul (hi + lo split; bfloat16
    dots are wrong under the interpreter, so bfloat16 runs on the GPU only), counted insertion rounds (several key
    tiles per sample) and, for m_cmp < m_slc (case 0), the segment sum in float32 or float16:
    the reference's blocks up to near-ties; counted rounds pick exactly what the round-by-round test picks."""
    sizes, res, m_cmp, m_slc, hq, hkv, d, topk = CASES[case]
    x = random_batch(sizes, res, seed=res + d + 7)
    layout = layout_for(x.to(DEV), m_cmp, m_slc, m_slc, 0)
    q, _, _, k_cmp, v_cmp, _ = make_inputs(x, layout, hq, hkv, d, seed=d + 7, device=DEV, dtype=dtype)
    _, lse = compressed_attention_ref(q.double(), k_cmp.double(), v_cmp.double(), layout)
    scores = [s.cpu() for s in block_scores_ref(q.double(), k_cmp.double(), lse, layout)]
    ref_idx = select_blocks_ref(q.double(), k_cmp.double(), lse, layout, topk=topk)
    got = {}
    for counted in (True, False):
        for key in ("topk", "topk_seg"):
            # 64 rows: several programs per sample, every row chunk holding tokens
            monkeypatch.setitem(tc.CONFIG, key, {**tc.CONFIG[key], "variant": "dot", "key32": True, "m_split": m_split,
                                                 "rows": 64, "counted": counted, "BLOCK_J": 16, "lse_dot": lse_dot})
        got[counted] = tc.cmp_select_topk(q, k_cmp, lse.float(), layout, topk, d**-0.5)
        assert_topk_equivalent(got[counted].cpu(), ref_idx.cpu(), scores, layout,
                               rtol=1e-4 if dtype == torch.float32 else 1e-3)
    assert torch.equal(got[True], got[False])


@pytest.mark.parametrize("m_cmp,m_slc", [(2, 4), (4, 4)])
def test_topk_lists_match_one_list(m_cmp, m_slc, monkeypatch):
    """Top-k kept in several lists per token (4 of 4 rows, or 8 of the 2 rows one thread holds, with rounds counted
    over the tile or always two) and merged at the end: exactly the blocks of the single list (the lists' union
    holds every token's best blocks). Lists run where they are tuned (int32 keys, D <= 32, 16 heads per group)."""
    sizes, res, hq, hkv, d, topk = [37, 1, 70], 16, 16, 1, 16, 3
    x = random_batch(sizes, res, seed=res + d + 13)
    layout = layout_for(x.to(DEV), m_cmp, m_slc, m_slc, 0)
    q, _, _, k_cmp, v_cmp, _ = make_inputs(x, layout, hq, hkv, d, seed=d + 13, device=DEV)
    _, lse = tc.cmp_attention_fwd(q, k_cmp, v_cmp, layout, d**-0.5)
    got = {}
    for lists, fixed in ((1, False), (4, False), (8, False), (8, True)):
        for key in ("topk", "topk_seg"):
            monkeypatch.setitem(tc.CONFIG, key, {**tc.CONFIG[key], "variant": "dot", "key32": True, "rows": 64,
                                                 "counted": True, "skip": False, "BLOCK_J": 16, "lists": lists,
                                                 "fixed_rounds": fixed})
        got[lists, fixed] = tc.cmp_select_topk(q, k_cmp, lse, layout, topk, d**-0.5)
    assert all(torch.equal(got[key], got[1, False]) for key in got)
    assert bool((got[1, False] >= 0).any())


@pytest.mark.parametrize("m_cmp,m_slc,hq,hkv,m_split,lists", [
    (4, 4, 16, 1, 4, 8),   # 16 heads per group, 4 per chunk: the v1.1 shape, lists of the two rows a thread holds
    (4, 4, 16, 1, 2, 1),   # 8 heads per chunk, one list
    (2, 4, 16, 1, 4, 1),   # m_cmp < m_slc: the head sums feed the segment sum
    (4, 4, 6, 2, 2, 1),    # 3 heads padded to 4: a padding head in every chunk
])
def test_topk_head_sum_in_registers_matches_reference(m_cmp, m_slc, hq, hkv, m_split, lists, monkeypatch):
    """The group's head sum by float32 adds in each thread's registers (rows in ``_token_rows_lanes``'s order;
    16-bit inputs, float32 keeps the group matmul): the reference's blocks up to near-ties, as the matmul's."""
    sizes, res, d, topk = [37, 1, 70], 16, 16, 3
    x = random_batch(sizes, res, seed=res + d + 17)
    layout = layout_for(x.to(DEV), m_cmp, m_slc, m_slc, 0)
    q, _, _, k_cmp, v_cmp, _ = make_inputs(x, layout, hq, hkv, d, seed=d + 17, device=DEV, dtype=torch.float16)
    _, lse = compressed_attention_ref(q.double(), k_cmp.double(), v_cmp.double(), layout)
    scores = [s.cpu() for s in block_scores_ref(q.double(), k_cmp.double(), lse, layout)]
    ref_idx = select_blocks_ref(q.double(), k_cmp.double(), lse, layout, topk=topk)
    for head_sum in ("dot", "regs"):
        for key in ("topk", "topk_seg"):
            monkeypatch.setitem(tc.CONFIG, key, {**tc.CONFIG[key], "variant": "dot", "key32": True, "rows": 64,
                                                 "m_split": m_split, "BLOCK_J": 16, "lists": lists,
                                                 "head_sum": head_sum})
        idx = tc.cmp_select_topk(q, k_cmp, lse.float(), layout, topk, d**-0.5)
        assert_topk_equivalent(idx.cpu(), ref_idx.cpu(), scores, layout, rtol=1e-3)


def test_token_rows_lanes_cover_the_tile_once():
    """``_token_rows_lanes``: each (token, head) of a tile in exactly one row of one chunk, and in the accumulator
    order (column n = 8i + 2c + e) a quad lane c holds only tokens ≡ c (mod 4), every head of them in its registers."""
    import triton
    import triton.language as tl

    @triton.jit
    def rows_kernel(TOK, HEAD, HS: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
                    M_SPLIT: tl.constexpr):
        for chunk in tl.static_range(M_SPLIT):
            tok, head, _ = tc._token_rows_lanes(0, BLOCK_T, 0, chunk, HS, BLOCK_T, ROWS)
            n = chunk * ROWS + tl.arange(0, ROWS)
            tl.store(TOK + n, tok)
            tl.store(HEAD + n, head)

    block_t, hs, m_split = 16, 16, 4
    rows = block_t * hs // m_split
    tok = torch.empty(m_split * rows, dtype=torch.int32, device=DEV)
    head = torch.empty_like(tok)
    rows_kernel[(1,)](tok, head, HS=hs, BLOCK_T=block_t, ROWS=rows, M_SPLIT=m_split)
    tok, head = tok.cpu().long(), head.cpu().long()
    assert sorted((tok * hs + head).tolist()) == list(range(block_t * hs))
    lane = (torch.arange(m_split * rows) % rows) // 2 % 4
    assert torch.equal(tok % 4, lane)
    # per chunk, the rows of one token are its H_C heads, all held by one lane
    for chunk in range(m_split):
        sl = slice(chunk * rows, (chunk + 1) * rows)
        assert sorted(set(head[sl].tolist())) == list(range(chunk * hs // m_split, (chunk + 1) * hs // m_split))


def test_topk_default_falls_back_to_int64_keys(monkeypatch):
    """Samples with more selection blocks than int32 keys can tell apart use int64 keys with the other default
    options (forced here by a 0-bit limit): the same blocks as with int32 keys (no near-ties at this size)."""
    sizes, res, m_cmp, m_slc, hq, hkv, d, topk = CASES[3]
    x = random_batch(sizes, res, seed=res + d + 11)
    layout = layout_for(x.to(DEV), m_cmp, m_slc, m_slc, 0)
    q, _, _, k_cmp, v_cmp, _ = make_inputs(x, layout, hq, hkv, d, seed=d + 11, device=DEV)
    _, lse = tc.cmp_attention_fwd(q, k_cmp, v_cmp, layout, d**-0.5)
    monkeypatch.setitem(tc.CONFIG, "topk", {**tc.CONFIG["topk"], "key32": True, "rows": 64, "BLOCK_J": 16})
    want = tc.cmp_select_topk(q, k_cmp, lse, layout, topk, d**-0.5)
    monkeypatch.setattr(tc, "KEY32_MAX_ID_BITS", 0)
    kernel, launched = tc._cmp_topk_dot_kernel, []

    class Recorder:  # records the launch's KEY32 flag
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["KEY32"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tc, "_cmp_topk_dot_kernel", Recorder())
    assert torch.equal(tc.cmp_select_topk(q, k_cmp, lse, layout, topk, d**-0.5), want)
    assert launched == [False]


@pytest.mark.parametrize("shift,rowsum,case", [("bound", "reduce", 3), ("bound", "dot", 1), ("online", "reduce", 3),
                                                ("bound", "lanes", 3), ("online", "lanes", 1)])
def test_forward_shift_modes_match_reference(shift, rowsum, case, monkeypatch):
    """The compressed forward with a fixed per-row softmax shift (|q| · the sample's largest key norm, no running
    max; row sums by per-row adds, per-lane partials or on the tensor cores) or the online softmax: output, LSE,
    top-k and every gradient."""
    monkeypatch.setitem(tc.CONFIG, "fwd", {**tc.CONFIG["fwd"], "shift": shift, "rowsum": rowsum, "BLOCK_C": 16})
    check_forward_topk_grads(*CASES[case], seed=9, o_tol=(2e-5, 1e-4), lse_tol=(2e-5, 1e-5), topk_rtol=1e-4,
                             grad_tol=(5e-5, 1e-4))


def test_bound_shift_falls_back_to_online_softmax(monkeypatch):
    """A compressed key of huge norm orthogonal to every query puts the Cauchy–Schwarz shift ~1400 binades above
    the real logits (every probability would flush to 0): the tile reruns with the online softmax and matches."""
    monkeypatch.setitem(tc.CONFIG, "fwd", {**tc.CONFIG["fwd"], "shift": "bound", "rowsum": "dot", "BLOCK_C": 16})
    sizes, res, m_cmp, m_slc, hq, hkv, d, topk = CASES[0]
    x = random_batch(sizes, res, seed=13)
    layout = layout_for(x.to(DEV), m_cmp, m_slc, m_slc, 0)
    q, _, _, k_cmp, v_cmp, _ = make_inputs(x, layout, hq, hkv, d, seed=13, device=DEV)
    q[..., 0] = 0.0
    first = layout.cu_cmp[:-1].long()
    k_cmp[first] = 0.0
    k_cmp[first, :, 0] = 1e3
    o, lse = tc.cmp_attention_fwd(q, k_cmp, v_cmp, layout, d**-0.5)
    o_ref, lse_ref = compressed_attention_ref(q.double(), k_cmp.double(), v_cmp.double(), layout)
    torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), lse_ref, atol=2e-5, rtol=1e-5)


def test_topk_config_fits_shared_memory():
    """The dot top-k's config shrinks on the host until its shared-memory estimate fits: the bfloat16 v1.1 default
    (16 heads per group) stays as it is; float32 with one or two heads per group (256 / 128 tokens per program) or
    wide heads gets fewer stages and fewer tokens; without a limit (interpreter) nothing changes."""
    limit = 232448  # H100 / H200 per-block opt-in
    shape = dict(block_j=64, block_c=64, lse_dot=True, one_cmp_per_slc=True)
    assert tc._topk_fit(256, 3, 4, 16, limit, block_d=32, esz=2, **shape) == (256, 3, 4, 16)
    for hs_pad, block_d in ((1, 32), (2, 32), (2, 128), (16, 128)):
        rows, stages, m_split, block_t = tc._topk_fit(256, 3, 4, hs_pad, limit, block_d=block_d, esz=4, **shape)
        assert tc._topk_smem_bytes(block_t, hs_pad, block_d=block_d, m_split=m_split, stages=stages, esz=4,
                                   **shape) <= limit
        assert block_t * hs_pad >= 16 * m_split and block_t >= 16
    assert tc._topk_fit(256, 3, 4, 1, limit, block_d=32, esz=4, **shape)[3] < 256
    assert tc._topk_fit(256, 3, 4, 1, None, block_d=32, esz=4, **shape) == (256, 3, 4, 256)
