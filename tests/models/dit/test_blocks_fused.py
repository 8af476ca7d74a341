"""The DiT blocks' inference path (fused norms of d3s2.ops.dit_norm) against their autograd (training) path.

Without CUDA the triton kernels run under TRITON_INTERPRET=1 on tiny models; the ``gpu`` test runs a full-size
dense block in bf16 and replays it from a CUDA graph.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (first import below)

pytest.importorskip("triton")

from d3s2.ops import use_backend  # noqa: E402

from .common import perturb, random_cond, random_sparse, tiny_dense, tiny_sparse  # noqa: E402


def _paths(model, *inputs):
    """(autograd path, inference path on the torch backend, inference path on the triton backend)."""
    train = model(*inputs)
    with torch.no_grad():
        with use_backend("dit_norm", "torch"):
            ref = model(*inputs)
        with use_backend("dit_norm", "triton"):
            fused = model(*inputs)
    return train, ref, fused


def test_dense_dit_inference_path_matches_autograd_path():
    model = tiny_dense()
    perturb(model, scale=0.3)
    x, t = torch.randn(2, 3, 4, 4, 4), torch.tensor([100.0, 700.0])
    train, ref, fused = _paths(model, x, t, random_cond(2))
    assert train.requires_grad
    torch.testing.assert_close(ref, train.detach(), rtol=1e-5, atol=1e-6)  # same ops as the autograd path
    torch.testing.assert_close(fused, train.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("counts", [(5, 9), (7, 7)], ids=["ragged", "uniform"])
def test_sparse_dit_inference_path_matches_autograd_path(counts):
    model = tiny_sparse()
    perturb(model, scale=0.3)
    x = random_sparse(counts)
    train, ref, fused = _paths(model, x, torch.tensor([100.0, 700.0]), random_cond(2))
    torch.testing.assert_close(ref.feats, train.feats.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.feats, train.feats.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_full_size_dense_block_bf16_and_cuda_graph():
    """A published-width dense block (C 1024, 16 heads, 2 × 4096 tokens) in bf16: the fused inference path is
    within bf16 rounding of the autograd path, and replays from a CUDA graph."""
    from d3s2.models.dit import ConditionTokens
    from d3s2.models.dit.blocks import ModulatedCrossBlock, SelfAttention

    torch.manual_seed(0)
    block = ModulatedCrossBlock(1024, 1024, 16, SelfAttention(1024, 16, qk_rms_norm=True))
    perturb(block, scale=0.02)
    block = block.cuda().bfloat16()
    x = torch.randn(2, 4096, 1024, device="cuda").bfloat16()
    t_emb = torch.randn(2, 1024, device="cuda").bfloat16()
    cond = ConditionTokens(torch.randn(2, 257, 1024, device="cuda").bfloat16())
    ref64 = block.double()(x.double(), t_emb.double(), ConditionTokens(cond.tokens.double())).detach()
    block = block.bfloat16()
    train = block(x, t_emb, cond).detach()
    with torch.no_grad():
        fused = block(x, t_emb, cond)
        err, base = ((o.double() - ref64).abs().max().item() for o in (fused, train))
        assert err <= 2 * base + 1e-2, (err, base)
        static = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            block(static, t_emb, cond)  # warm-up (compiles the kernels) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = block(static, t_emb, cond)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, fused)
