"""Weight clipping search: shrink each block's quantization range to minimize output error.

RTN sets ``s = absmax / qmax``, wasting levels on a few large weights. Clipping the range to
``r * absmax`` (r <= 1) trades a clipping error on those weights for a finer step on the rest.
As in AWQ's auto-clip (Lin et al., MLSys 2024) and OmniQuant's learnable clipping (Shao et al.,
ICLR 2024), ``r`` is chosen per block (per (row, group), per row, or per tile) to minimize the
error of the layer output on calibration inputs, not of the weight::

    e(r) = sum_n d_n H_B d_n^T,   d = W_B - Q_r(W_B),   H = 2/n X^T X (block B's columns)

(cross terms between column blocks are ignored, so blocks are searched independently). The grid
``r in linspace(1, 1 - max_shrink, n_grid)`` contains r = 1, i.e. RTN, so the searched objective
is never worse than RTN. The result goes to ``ctx.qweights`` (float weights are untouched).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.methods.base import (LayerContext, check_int, check_number, hessian_of, regular_weight,
                               quantize_with_scale, weight_block_cols, weight_grid, dequantize_qweight)
from mixq.quant import QTensor

__all__ = ["Clip", "clip_search"]


def _block_errors(w: torch.Tensor, qt: QTensor, h: torch.Tensor) -> torch.Tensor:
    """Output error per (row, column block): (Np, nC) for a padded QTensor."""
    np_, kp = qt.q.shape
    n, k = w.shape
    wp = torch.zeros(np_, kp, device=w.device)
    wp[:n, :k] = w
    d = wp - dequantize_qweight(qt, np_, kp)
    bc = weight_block_cols(qt.spec, kp)
    hp = torch.zeros(kp, kp, device=h.device)
    hp[:k, :k] = h
    out = []
    for j in range(0, kp, bc):
        dj = d[:, j:j + bc]
        out.append(((dj @ hp[j:j + bc, j:j + bc]) * dj).sum(1))
    return torch.stack(out, 1)


def clip_search(w: torch.Tensor, h: torch.Tensor, spec, *, n_grid: int = 20,
                max_shrink: float = 0.5) -> QTensor:
    """Clipped quantization of w (N, K) with per-block ratios minimizing ``d H d^T``.

    Args:
        w: (N, K) fp32 weight (regular columns). h: (K, K) fp32 Hessian of those columns.
        spec: the weight QuantSpec. n_grid: ratios tried. max_shrink: smallest ratio is 1 - it.
    Returns:
        QTensor (Np, Kp) (qweights convention).
    """
    n, k = w.shape
    ratios = torch.linspace(1.0, 1.0 - max_shrink, n_grid)
    best_err, best_scale, best_zero = None, None, None
    for r in ratios.tolist():
        scale, zero = weight_grid(w, spec, r)
        qt = quantize_with_scale(w, spec, scale, zero)
        e = _block_errors(w, qt, h)                                    # (Np, nC)
        np_ = e.shape[0]
        rows_per = np_ // scale.shape[0]
        e = e.reshape(scale.shape[0], rows_per, -1).sum(1)             # per scale row-block
        if scale.shape[1] != e.shape[1]:                               # tensor granularity
            e = e.sum(1, keepdim=True)
        if best_err is None:
            best_err, best_scale = e, scale.clone()
            best_zero = None if zero is None else zero.clone()
            continue
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return quantize_with_scale(w, spec, best_scale, best_zero)


@dataclass(frozen=True)
class Clip:
    """Per-block clipping-ratio search (see module docstring).

    Args:
        n_grid: number of ratios (2..200). max_shrink: in (0, 1): the smallest ratio is
            ``1 - max_shrink``.
    """

    n_grid: int = 20
    max_shrink: float = 0.5

    def __post_init__(self) -> None:
        check_int(self.n_grid, "Clip.n_grid", 2, 200)
        check_number(self.max_shrink, "Clip.max_shrink", 0.0, 1.0, lo_open=True, hi_open=True)

    def quantizes_weight(self, name: str, group_kind: str) -> bool:
        """Whether `apply` hands the linear `name` (within its layer; LinearGroup kind
        `group_kind`) method-quantized int4 weights (``ctx.qweights``): every linear."""
        return True

    def apply(self, ctx: LayerContext) -> None:
        for g in ctx.groups:
            for n, lin in zip(g.names, g.linears):
                idx = ctx.outliers(n)
                w_reg, _, perm = regular_weight(lin, idx)
                h = hessian_of(ctx.stats[n])[perm][:, perm][:w_reg.shape[1], :w_reg.shape[1]]
                ctx.set_qweight(n, clip_search(w_reg, h, ctx.weight_spec(n), n_grid=self.n_grid,
                                               max_shrink=self.max_shrink))
