"""Issue 4, session 27: do the SSA forward's independent launches gain from running side by side on two streams?

Sessions 9-26 measured each compressed pass latency-bound (neither the exp unit, the issue slots nor the tensor cores
full), with its exps in bursts that fill the MUFU queue. Kernels of a different mix on the same SMs could fill each
other's gaps. Measured here (H200/H100, v1.1, N = 133,758, seed-0 inputs of ``bench_ssa.v11_state``):

- ``pair``: the compressed forward and the top-k (the latter on the forward's LSE from before) on two streams at once:
  the most that mixing these two kernels can give (not a valid order: the top-k needs this call's LSE).
- ``chunks C``: the tokens cut into C chunks; chunk i's top-k on a side stream after chunk i's forward, so chunk
  i + 1's forward runs beside it (a valid order); and the same chunks on one stream (the cost of chunking).
- ``ssa``: the whole forward as ``spatial_sparse_attention`` runs it, against the window attention on a side stream
  (it needs neither the LSE nor the selection) from the start or beside the selection, with the compressed passes
  whole or chunked as above.

Every variant's outputs are checked bitwise against the one-stream ones. Timing: do_bench medians, three rounds.

    PYTHONPATH=src python3 scripts/gpu/overlap27.py --layouts .gpu/layouts/latent_layouts_1024.npz --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_ssa as b  # noqa: E402

from d3s2.ops.block_attn import selection_attention, window_attention  # noqa: E402
from d3s2.ops.ssa import spatial_sparse_attention  # noqa: E402
from d3s2.ops.ssa import triton_combine as tcomb  # noqa: E402
from d3s2.ops.ssa import triton_compress as tc  # noqa: E402

TOPK = 8
ALIGN = 256  # chunk starts on a multiple of both kernels' token tiles, so every tile (and its bits) is unchanged


def _ms(fn) -> list[float]:
    return [round(float(do_bench(fn, warmup=10, rep=100, return_mode="median")), 4) for _ in range(3)]


def _chunks(layout, n: int, parts: int) -> list[tuple[int, int, object]]:
    """(first token, end, layout of that token range of the one sample) for ``parts`` aligned chunks."""
    if layout.cu_seqlens.numel() != 2:
        raise ValueError("expected a one-sample layout")
    step = -(-n // parts // ALIGN) * ALIGN
    out = []
    for a in range(0, n, step):
        e = min(a + step, n)
        cu = torch.tensor([0, e - a], dtype=torch.int32, device=layout.cu_seqlens.device)
        out.append((a, e, dataclasses.replace(layout, cu_seqlens=cu, max_seqlen=e - a)))
    return out


class TwoStreams:
    """Work on a side stream that starts after everything queued on the current one and is joined back."""

    def __init__(self, priority: int):
        self.side = torch.cuda.Stream(priority=priority)

    def fork(self) -> torch.cuda.Stream:
        self.side.wait_stream(torch.cuda.current_stream())
        return self.side

    def join(self) -> None:
        torch.cuda.current_stream().wait_stream(self.side)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    st = b.v11_state(args.layouts)
    layout, q, k, v, kc, vc, gates, lse0, scale = (st[x] for x in ("layout", "q", "k", "v", "kc", "vc", "gates",
                                                                 "lse", "scale"))
    n = q.shape[0]
    res = {"device": torch.cuda.get_device_name(), "n": n, "checks": {}}

    def fwd_topk():
        o, lse = tc.cmp_attention_fwd(q, kc, vc, layout, scale)
        return o, lse, tc.cmp_select_topk(q, kc, lse, layout, TOPK, scale)

    o_ref, lse_ref, idx_ref = fwd_topk()
    res["seq_ms"] = _ms(fwd_topk)
    res["fwd_ms"] = _ms(lambda: tc.cmp_attention_fwd(q, kc, vc, layout, scale))
    res["topk_ms"] = _ms(lambda: tc.cmp_select_topk(q, kc, lse0, layout, TOPK, scale))

    for name, prio in (("normal", 0), ("high", -1)):
        ts = TwoStreams(prio)

        def pair(ts=ts):
            with torch.cuda.stream(ts.fork()):
                idx = tc.cmp_select_topk(q, kc, lse0, layout, TOPK, scale)
            o, lse = tc.cmp_attention_fwd(q, kc, vc, layout, scale)
            ts.join()
            return o, lse, idx

        res[f"pair_{name}_ms"] = _ms(pair)

    for parts in (2, 4, 8):
        chunks = _chunks(layout, n, parts)

        def one_stream(chunks=chunks):
            outs = []
            for a, e, lay in chunks:
                o, lse = tc.cmp_attention_fwd(q[a:e], kc, vc, lay, scale)
                outs.append((o, lse, tc.cmp_select_topk(q[a:e], kc, lse, lay, TOPK, scale)))
            return [torch.cat(t) for t in zip(*outs)]

        res[f"chunks{parts}_one_stream_ms"] = _ms(one_stream)
        for name, prio in (("normal", 0), ("high", -1)):
            ts = TwoStreams(prio)

            def pipelined(chunks=chunks, ts=ts):
                outs = []
                for a, e, lay in chunks:
                    o, lse = tc.cmp_attention_fwd(q[a:e], kc, vc, lay, scale)
                    with torch.cuda.stream(ts.fork()):
                        idx = tc.cmp_select_topk(q[a:e], kc, lse, lay, TOPK, scale)
                    outs.append((o, lse, idx))
                ts.join()
                return [torch.cat(t) for t in zip(*outs)]

            got = pipelined()
            res["checks"][f"chunks{parts}_{name}"] = all(
                torch.equal(x, y) for x, y in zip(got, (o_ref, lse_ref, idx_ref)))
            res[f"chunks{parts}_{name}_ms"] = _ms(pipelined)

    # the whole forward: as the op runs it, then with the window beside the compressed passes
    assert layout.win_perm is None, "the v1.1 benchmark layout has no window shift"
    o_full = spatial_sparse_attention(q, k, v, kc, vc, gates, layout, topk=TOPK, scale=scale, backend="triton")
    res["ssa_ms"] = _ms(lambda: spatial_sparse_attention(q, k, v, kc, vc, gates, layout, topk=TOPK, scale=scale,
                                                         backend="triton"))
    for parts in (1, 2, 4):
        chunks = _chunks(layout, n, parts)
        for name, prio in (("first", 0), ("first_high", -1), ("beside_selection", 0)):
            ts, ts_topk = TwoStreams(prio), TwoStreams(0)

            def ssa_side(chunks=chunks, ts=ts, ts_topk=ts_topk, window_last=name == "beside_selection"):
                side = ts.fork()
                if not window_last:
                    with torch.cuda.stream(side):
                        o_win = window_attention(q, k, v, layout.win_offsets, scale=scale)
                outs = []
                for a, e, lay in chunks:
                    o, lse = tc.cmp_attention_fwd(q[a:e], kc, vc, lay, scale)
                    if len(chunks) == 1:
                        outs.append((o, lse, tc.cmp_select_topk(q, kc, lse, lay, TOPK, scale)))
                        continue
                    with torch.cuda.stream(ts_topk.fork()):  # lse stays referenced until the join (allocator)
                        outs.append((o, lse, tc.cmp_select_topk(q[a:e], kc, lse, lay, TOPK, scale)))
                ts_topk.join()
                o_cmp, _, idx = (torch.cat(t) for t in zip(*outs))
                if window_last:  # the window beside the selection instead
                    with torch.cuda.stream(side):
                        o_win = window_attention(q, k, v, layout.win_offsets, scale=scale)
                o_slc = selection_attention(q, k, v, layout.slc_offsets, idx, scale=scale,
                                            max_block_len=layout.m_slc**3)
                ts.join()
                return tcomb.gate_combine(gates, o_cmp, o_slc, o_win)

            key = f"ssa_window_{name}_chunks{parts}"
            res["checks"][key] = torch.equal(ssa_side(), o_full)
            res[key + "_ms"] = _ms(ssa_side)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out, "overlap27.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
