"""SSALayout's per-sample maxima, which size the kernels' grids and the top-k's int32 keys."""

from d3s2.ops.ssa.layout import build_ssa_layout

from .helpers import random_batch


def test_layout_maxima_match_offsets():
    """max_seqlen / max_cmp / max_slc are the largest per-sample token, compression-block and selection-block counts
    (sample 1 is a compact ball: few blocks, so the maxima come from different samples)."""
    x = random_batch([37, 60, 20], 16, seed=4, compact=(1,))
    layout = build_ssa_layout(x, m_cmp=2, m_slc=4, m_win=4)
    per_sample = {name: (off[1:] - off[:-1]).tolist()
                  for name, off in (("tok", layout.cu_seqlens), ("cmp", layout.cu_cmp), ("slc", layout.cu_slc))}
    assert layout.max_seqlen == max(per_sample["tok"]) == 60
    assert layout.max_cmp == max(per_sample["cmp"]) and layout.max_slc == max(per_sample["slc"])
    assert per_sample["slc"].index(layout.max_slc) != 1  # the largest sample by tokens is not the one with most blocks
    assert layout.max_cmp > layout.max_slc  # two compression cells per block side: up to 8 per selection block
