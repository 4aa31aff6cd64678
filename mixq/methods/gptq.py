"""GPTQ: quantize a weight column by column, compensating each rounding error on the rest.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023 (from Optimal Brain Quantization). Minimize ``||X W^T - X Q^T||^2``
row-wise with ``H = 2/n X^T X`` (K, K). Quantizing column i with error ``e = (w_i - q_i) / [H^-1]_ii``
the best update of the not-yet-quantized columns F is::

    W_F <- W_F - e [H^-1]_{i,F}

With ``U = chol(H^-1)^T`` (upper Cholesky factor) the rows of U give exactly these updates in
order. Columns are processed in blocks of `block_size`: inside a block updates are immediate,
the rest of the matrix gets one lazy rank-B update per block. ``H += damp * mean(diag H) * I``
for stability; columns with ``H_ii = 0`` (dead inputs) are zeroed.

mixq specifics:

* FP16 outlier columns are placed *last* (`outlier_permutation`) and never quantized, but they
  receive the error compensation of the int4 columns (as in SpQR), so GPTQ writes the updated
  outlier columns back into ``linear.weight``; the int4 part goes to ``ctx.qweights``.
* Scales: per-row / per-tensor scales come from the original weights. Group / tile scales are
  computed from the *updated* weights when the column block is reached (``static_groups=False``,
  the reference implementation). With ``act_order=True`` (columns in order of decreasing
  ``H_ii``) group scales are static (from the original weights) so groups stay contiguous for
  the kernels.
* Attention sink (``sink_weight``): the first token of each calibration sequence is the one
  every later token attends to, yet it is one row of T in ``X^T X``; ``sink_weight=w`` counts
  it w times (``H + (w - 1) H_sink``, `mixq.methods.base.hessian_of`; ``"seqlen"``: w = T).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.config import QuantSpec
from mixq.methods.base import (LayerContext, _padded_shape, check_int, check_number, hessian_of,
                               regular_weight, weight_block_cols, weight_grid)
from mixq.quant import QTensor, expand_blocks

__all__ = ["GPTQ", "gptq_quantize"]


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, kq: int, spec: QuantSpec, *,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = False
                  ) -> tuple[QTensor, torch.Tensor]:
    """GPTQ of the first `kq` columns of w (N, K); the others are updated, not quantized.

    Args:
        w: (N, K) fp32 weight with the kq regular columns first, then the FP16 ones.
        h: (K, K) fp32 Hessian in the same column order.
        kq: number of columns to quantize. spec: the weight QuantSpec.
        block_size, damp, act_order: see `GPTQ`.
    Returns:
        ``(qt, w_rest)``: QTensor (Np, Kp) of the regular columns (original order),
        and the updated FP16 columns (N, K - kq) fp32.
    """
    n, k = w.shape
    W = w.double().clone()
    H = h.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    order = torch.arange(k, device=W.device)
    if act_order:
        order[:kq] = torch.argsort(torch.diag(H)[:kq], descending=True, stable=True)
    W, H = W[:, order], H[order][:, order]
    H += damp * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    np_, kp = _padded_shape(n, kq, spec)
    bc = weight_block_cols(spec, kp)
    dynamic = spec.granularity in ("group", "tile") and not act_order
    S = torch.ones(np_, kp, dtype=torch.float64, device=W.device)
    Z = torch.zeros(np_, kp, dtype=torch.float64, device=W.device)
    scales, zeros = [], []
    if not dynamic:
        sc, zc = weight_grid(w[:, :kq].float(), spec)
        scales, zeros = [sc], [zc]
        S = expand_blocks(sc, (np_, kp), spec).double()
        if zc is not None:
            Z = expand_blocks(zc, (np_, kp), spec).double()
    B = bc * max(1, block_size // bc) if dynamic else block_size
    order_l = order.tolist()                            # host copy: no per-column device sync
    Q = torch.zeros(n, kq, dtype=torch.float64, device=W.device)
    for i1 in range(0, kq, B):
        i2 = min(i1 + B, kq)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic and col % bc == 0:
                sub_spec = spec
                sc, zc = weight_grid(W1[:, i:i + bc].float(), sub_spec)
                scales.append(sc)
                zeros.append(zc)
                width = min(bc, kq - col)
                S[:, col:col + width] = expand_blocks(sc, (np_, bc), spec).double()[:, :width]
                if zc is not None:
                    Z[:, col:col + width] = expand_blocks(zc, (np_, bc), spec).double()[:, :width]
            oc = order_l[col]                          # original column index (< kq)
            s, z = S[:n, oc], Z[:n, oc]
            q = (torch.round(W1[:, i] / s) + z).clamp(spec.qmin, spec.qmax)
            Q[:, oc] = q
            err = (W1[:, i] - (q - z) * s) / U[col, col]
            W1[:, i:] -= err[:, None] * U[col, i1 + i:i2][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]
    scale = torch.cat(scales, 1) if dynamic else scales[0]
    zero = None if zeros[0] is None else (torch.cat(zeros, 1) if dynamic else zeros[0])
    qfull = torch.zeros(np_, kp, device=W.device)
    qfull[:n, :kq] = Q.float()
    if zero is not None:   # padding must dequantize to 0
        qfull[:, kq:] = expand_blocks(zero, (np_, kp), spec)[:, kq:].float()
    qfull[n:, :] = qfull[n:, :] if zero is None else expand_blocks(zero, (np_, kp), spec)[n:].float()
    dtype = torch.uint8 if (not spec.symmetric and spec.qmax > 127) else torch.int8
    qt = QTensor(q=qfull.to(dtype), scale=scale, zero=zero, spec=spec)
    return qt, W[:, kq:].float()


@dataclass(frozen=True)
class GPTQ:
    """GPTQ weight quantizer (see module docstring).

    Args:
        block_size: lazy-update block width (>= 1; rounded to a multiple of the group size).
        damp: relative dampening in [0, 1) (GPTQ default 0.01).
        act_order: quantize columns in decreasing H_ii order (static group scales).
        sink_weight: weight of each calibration sequence's first token in H (`hessian_of`):
            1 = plain GPTQ; ``"seqlen"`` (default) = T, as if the attention-sink token were as
            important as all the tokens that read it. SmolLM2-135M, 8-window protocol
            (`results/gptq_sink_smollm2_cpu.json`): W4A16 g128 + GPTQ 32.32 with 1, 26.51 with
            "seqlen" (RTN: 29.98).
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    sink_weight: float | str = "seqlen"

    def __post_init__(self) -> None:
        check_int(self.block_size, "GPTQ.block_size", 1, 1 << 16)
        check_number(self.damp, "GPTQ.damp", 0.0, 1.0, hi_open=True)
        if not isinstance(self.act_order, bool):
            raise ValueError(f"GPTQ.act_order must be a bool, got {self.act_order!r}")
        if self.sink_weight != "seqlen":
            check_number(self.sink_weight, "GPTQ.sink_weight (or 'seqlen')", 0.0, lo_open=True)

    def quantizes_weight(self, name: str, group_kind: str) -> bool:
        """Whether `apply` hands the linear `name` (within its layer; LinearGroup kind
        `group_kind`) method-quantized int4 weights (``ctx.qweights``): every linear."""
        return True

    def apply(self, ctx: LayerContext) -> None:
        for g in ctx.groups:
            for n, lin in zip(g.names, g.linears):
                idx = ctx.outliers(n)
                w_reg, w_out, perm = regular_weight(lin, idx)
                kq = w_reg.shape[1]
                h = hessian_of(ctx.stats[n], self.sink_weight)[perm][:, perm]
                qt, w_rest = gptq_quantize(torch.cat([w_reg, w_out], 1), h, kq, ctx.weight_spec(n),
                                           block_size=self.block_size, damp=self.damp,
                                           act_order=self.act_order)
                ctx.set_qweight(n, qt)
                if idx.numel():
                    with torch.no_grad():
                        lin.weight[:, perm[kq:]] = w_rest.to(lin.weight.dtype)
