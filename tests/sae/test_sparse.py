"""Sparse decode (icl_circuits.sae.sparse): forward and gradients equal the dense f @ W_dec."""

from __future__ import annotations

import pytest
import torch

from icl_circuits.sae.sparse import sparse_decode, sparse_decode_topk

D_SAE, D_OUT = 50, 12


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_reference(
    rows: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, W: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """The dense computation: build f [n_rows, d_sae] (duplicates add up), then f @ W."""
    f = torch.zeros(n_rows, W.shape[0], dtype=vals.dtype).index_put((rows, idx), vals, accumulate=True)
    return f @ W  # [n_rows, d_out]


def grads_of(fn, vals: torch.Tensor, W: torch.Tensor, probe: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output and the gradients of <out, probe> w.r.t. vals and W."""
    vals = vals.detach().clone().requires_grad_(True)
    W = W.detach().clone().requires_grad_(True)
    out = fn(vals, W)
    gv, gW = torch.autograd.grad((out * probe).sum(), [vals, W])
    return out.detach(), gv, gW


TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_form_matches_dense(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    batch, k = 9, 4
    idx = torch.stack([torch.randperm(D_SAE, generator=g)[:k] for _ in range(batch)])  # [9, 4] distinct per row
    idx[1] = idx[0]  # the same latents in two rows (repeated indices across rows)
    vals = torch.randn(batch, k, generator=g, dtype=dtype)
    vals[2] = 0.0  # a row whose entries are all zero
    W = torch.randn(D_SAE, D_OUT, generator=g, dtype=dtype)
    probe = torch.randn(batch, D_OUT, generator=g, dtype=dtype)
    rows = torch.arange(batch).repeat_interleave(k)

    out, gv, gW = grads_of(lambda v, w: sparse_decode_topk(idx, v, w), vals, W, probe)
    ref, rv, rW = grads_of(lambda v, w: dense_reference(rows, idx.reshape(-1), v.reshape(-1), w, batch), vals, W, probe)
    assert out.shape == (batch, D_OUT) and gv.shape == (batch, k) and gW.shape == (D_SAE, D_OUT)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(gv, rv, **TOL[dtype])
    torch.testing.assert_close(gW, rW, **TOL[dtype])
    inactive = torch.ones(D_SAE, dtype=torch.bool)
    inactive[idx.reshape(-1)] = False
    assert inactive.any() and (gW[inactive] == 0).all()  # only active decoder rows receive gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coo_form_matches_dense(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    n_rows = 7
    # rows unsorted; row 3 and row 6 (the last) empty; latent 5 in several rows; (0, 5) given twice
    rows = torch.tensor([4, 0, 2, 0, 5, 1, 0, 2, 4, 1, 5])
    idx = torch.tensor([5, 5, 9, 5, 49, 0, 17, 5, 30, 30, 5])
    vals = torch.randn(rows.numel(), generator=g, dtype=dtype)
    W = torch.randn(D_SAE, D_OUT, generator=g, dtype=dtype)
    probe = torch.randn(n_rows, D_OUT, generator=g, dtype=dtype)

    out, gv, gW = grads_of(lambda v, w: sparse_decode(rows, idx, v, w, n_rows), vals, W, probe)
    ref, rv, rW = grads_of(lambda v, w: dense_reference(rows, idx, v, w, n_rows), vals, W, probe)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(gv, rv, **TOL[dtype])  # gradients come back in the caller's (unsorted) order
    torch.testing.assert_close(gW, rW, **TOL[dtype])
    assert (out[3] == 0).all() and (out[6] == 0).all()  # empty rows decode to zero
    assert gv[1] == pytest.approx(gv[3].item()) and gv[1] != gv[6]  # duplicates share a gradient, others differ
    inactive = torch.ones(D_SAE, dtype=torch.bool)
    inactive[idx] = False
    assert (gW[inactive] == 0).all() and (gW[idx] != 0).any(-1).all()


def test_no_entries_at_all() -> None:
    W = torch.randn(D_SAE, D_OUT, requires_grad=True)
    vals = torch.zeros(0, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    out = sparse_decode(empty, empty, vals, W, 3)
    assert out.shape == (3, D_OUT) and (out == 0).all()
    out.sum().backward()
    assert W.grad is not None and (W.grad == 0).all() and vals.grad is not None and vals.grad.shape == (0,)


def test_bad_shapes() -> None:
    W = torch.randn(D_SAE, D_OUT)
    with pytest.raises(ValueError, match="batch, k"):
        sparse_decode_topk(torch.zeros(4, dtype=torch.long), torch.zeros(4), W)
    with pytest.raises(ValueError, match="one length"):
        sparse_decode(torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.zeros(3), W, 2)
