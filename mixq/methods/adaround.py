"""AdaRound: learn whether each weight rounds up or down, on the layer's output error.

Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020.
Round-to-nearest is optimal per weight but not for the output: with ``H = 1/n X^T X`` the
output error of one row is ``d H d^T`` (``d = w - w_q``), and the cross terms make some
"wrong-way" roundings better. On the RTN grid (scale ``s``, zero ``z`` per block, kept fixed)
AdaRound relaxes the choice floor / floor + 1 with a per-weight continuous variable V::

    W~(V) = s * (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z)
    h(V)  = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1

(the rectified sigmoid) and minimizes, with Adam, the reconstruction plus a regularizer that
drives every h to 0 or 1::

    L(V) = ||X W^T - X W~(V)^T||_F^2 / c  +  lambda * sum_ij (1 - |2 h(V_ij) - 1|^beta)

``beta`` is annealed linearly from ``beta[0]`` (flat: rounding still free) to ``beta[1]`` (sharp)
after a warm start (the first ``warmup`` fraction of the steps without regularizer), as in the
paper. ``c = mean(diag H) * mean(s^2)`` measures the error in units of (squared) grid steps, so
``lambda = reg_weight`` balances against a per-weight term whatever the scale of X and W.
V starts where ``h(V)`` equals the fractional part of ``W / s`` (the paper's initialization).
At the end ``h`` is rounded hard (``V >= 0`` -> up).

mixq specifics:

* Calibration inputs: ``H`` from ``ctx.stats[name]`` (`hessian_of`: the collected Hessian or the
  ``inputs`` rows); the full-batch loss ``tr(D H D^T)`` equals ``||X D^T||^2 / n`` exactly.
* FP16 outlier columns (placed last, `outlier_permutation`) are never quantized. As in GPTQ
  they absorb the int4 columns' error (``update_outliers=True``): for a rounding error D of the
  regular columns the best FP16 update is ``W_out += D H_ro H_oo^-1`` and the remaining error
  is ``tr(D S D^T)`` with the Schur complement ``S = H_rr - H_ro H_oo^-1 H_or``, which is then
  the reconstruction AdaRound minimizes. The updated columns are written back to
  ``linear.weight``; the int4 part goes to ``ctx.qweights`` (qweights convention, same grid and
  padding as RTN / GPTQ).
* The objective separates over output rows, so each row keeps the better of its learned and its
  RTN rounding (exact check): AdaRound's calibration objective is never above RTN's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.config import TARGET_ALIASES, TARGETS, QuantSpec
from mixq.methods.base import (LayerContext, check_choice, check_int, check_number,
                               hessian_of, linear_kind, quantize_with_scale, regular_weight,
                               weight_grid)
from mixq.quant import QTensor, expand_blocks

__all__ = ["AdaRound", "adaround_quantize", "rectified_sigmoid"]

ZETA, GAMMA = 1.1, -0.1
_KINDS = TARGETS + tuple(TARGET_ALIASES)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (Louizos et al. 2018)."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _row_objective(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``d_n H d_n^T`` per row (N,)."""
    return ((d @ h) * d).sum(1)


def adaround_quantize(w: torch.Tensor, h: torch.Tensor, kq: int, spec: QuantSpec, *,
                      n_steps: int = 200, lr: float = 1e-2, reg_weight: float = 0.01,
                      beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2,
                      damp: float = 0.01, update_outliers: bool = True
                      ) -> tuple[QTensor, torch.Tensor]:
    """AdaRound of the first `kq` columns of w (N, K); the other columns are FP16.

    Args:
        w: (N, K) fp32 weight, the kq regular columns first, then the FP16 ones.
        h: (K, K) fp32 Hessian (``~ X^T X``, any positive factor) in the same column order.
        kq: columns to quantize (1..K). spec: the weight QuantSpec (its RTN grid is kept).
        n_steps, lr, reg_weight, beta, warmup: optimisation (module docstring).
        damp: relative dampening of ``H_oo`` when solving for the FP16 update.
        update_outliers: let the FP16 columns absorb the rounding error (GPTQ-style).
    Returns:
        ``(qt, w_rest)``: QTensor (Np, Kp) of the regular columns (qweights convention) and the
        (updated) FP16 columns (N, K - kq) fp32.
    """
    n, k = w.shape
    w = w.detach().float()
    h = h.detach().double()
    w_reg, w_out = w[:, :kq], w[:, kq:]
    h_rr = h[:kq, :kq]
    solve = None
    if update_outliers and k > kq:
        h_oo = h[kq:, kq:] + damp * float(torch.diag(h[kq:, kq:]).mean().clamp(min=1e-12)) * \
            torch.eye(k - kq, dtype=h.dtype, device=h.device)
        solve = torch.linalg.solve(h_oo, h[kq:, :kq])              # H_oo^-1 H_or (k, kq)
        h_rr = h_rr - h[:kq, kq:] @ solve                          # Schur complement
    h_rr = (h_rr + h_rr.T) / 2

    scale, zero = weight_grid(w_reg, spec)
    rtn = quantize_with_scale(w_reg, spec, scale, zero)
    np_, kp = rtn.q.shape
    s = expand_blocks(scale, (np_, kp), spec).float()[:n, :kq]
    z = (torch.zeros_like(s) if zero is None
         else expand_blocks(zero, (np_, kp), spec).float()[:n, :kq])
    base = torch.floor(w_reg / s)
    rest = (w_reg / s - base).clamp(1e-4, 1 - 1e-4)
    # h(V0) = rest  <=>  sigmoid(V0) = (rest - gamma) / (zeta - gamma)
    p = (rest - GAMMA) / (ZETA - GAMMA)
    v = torch.log(p / (1 - p)).detach().clone().requires_grad_(True)
    hf = h_rr.float()
    c = float(torch.diag(hf).mean().clamp(min=1e-30)) * float((s ** 2).mean().clamp(min=1e-30))
    opt = torch.optim.Adam([v], lr=lr)
    n_warm = int(warmup * n_steps)

    def soft(vv):
        return s * ((base + rectified_sigmoid(vv) + z).clamp(spec.qmin, spec.qmax) - z)

    with torch.enable_grad():              # mixq.quantize runs methods under no_grad
        for step in range(n_steps):
            d = w_reg - soft(v)
            loss = ((d @ hf) * d).sum() / c
            if step >= n_warm:
                t = (step - n_warm) / max(1, n_steps - n_warm - 1)
                b = beta[0] + (beta[1] - beta[0]) * t
                loss = loss + reg_weight * (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(b)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    with torch.no_grad():
        q_ada = (base + (v >= 0).float() + z).clamp(spec.qmin, spec.qmax)
        q_rtn = rtn.q[:n, :kq].float()
        d_ada = (w_reg.double() - (s * (q_ada - z)).double())
        d_rtn = (w_reg.double() - (s * (q_rtn - z)).double())
        better = _row_objective(d_ada, h_rr) <= _row_objective(d_rtn, h_rr)
        q = torch.where(better[:, None], q_ada, q_rtn)
        qfull = rtn.q.clone()
        qfull[:n, :kq] = q.to(qfull.dtype)
        w_rest = w_out.clone()
        if solve is not None:
            d = w_reg.double() - (s * (q - z)).double()
            w_rest = (w_out.double() + d @ solve.T).float()
    return QTensor(q=qfull, scale=rtn.scale, zero=rtn.zero, spec=spec), w_rest


@dataclass(frozen=True)
class AdaRound:
    """AdaRound weight quantizer (see module docstring).

    Args:
        n_steps: Adam steps per linear (1..100000). lr: Adam learning rate in (0, 10].
        reg_weight: lambda of the rounding regularizer, >= 0.
        beta: (start, end) of the annealed regularizer exponent, both > 0, start >= end.
        kinds: linear kinds processed ("q", "k", "v", "o", "gate", "up", "down"; OPT "out",
            "fc1", "fc2" also accepted); the others keep RTN (or another quantizer).
        warmup: fraction [0, 1) of the steps without regularizer.
        damp: relative dampening of the FP16 block of H, in [0, 1).
        update_outliers: FP16 outlier columns absorb the rounding error (GPTQ-style).
    """

    n_steps: int = 200
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta: tuple = (20, 2)
    kinds: tuple[str, ...] = TARGETS
    warmup: float = 0.2
    damp: float = 0.01
    update_outliers: bool = True

    def __post_init__(self) -> None:
        check_int(self.n_steps, "AdaRound.n_steps", 1, 100000)
        check_number(self.lr, "AdaRound.lr", 0.0, 10.0, lo_open=True)
        check_number(self.reg_weight, "AdaRound.reg_weight", 0.0)
        if not isinstance(self.beta, tuple) or len(self.beta) != 2:
            raise ValueError(f"AdaRound.beta must be a (start, end) tuple, got {self.beta!r}")
        for b in self.beta:
            check_number(b, "AdaRound.beta item", 0.0, 1000.0, lo_open=True)
        if self.beta[0] < self.beta[1]:
            raise ValueError(f"AdaRound.beta must anneal downwards (start >= end), got {self.beta!r}")
        if not isinstance(self.kinds, tuple) or not self.kinds:
            raise ValueError(f"AdaRound.kinds must be a non-empty tuple, got {self.kinds!r}")
        for kd in self.kinds:
            check_choice(kd, "AdaRound.kinds item", _KINDS)
        check_number(self.warmup, "AdaRound.warmup", 0.0, 1.0, hi_open=True)
        check_number(self.damp, "AdaRound.damp", 0.0, 1.0, hi_open=True)
        if not isinstance(self.update_outliers, bool):
            raise ValueError(f"AdaRound.update_outliers must be a bool, got {self.update_outliers!r}")

    def _selected(self, name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        return linear_kind(name) in self.kinds or leaf.removesuffix("_proj") in self.kinds

    def quantizes_weight(self, name: str, group_kind: str) -> bool:
        """Whether `apply` hands the linear `name` (within its layer; LinearGroup kind
        `group_kind`) method-quantized int4 weights (``ctx.qweights``): those of its linear `kinds`."""
        return self._selected(name)

    def apply(self, ctx: LayerContext) -> None:
        for g in ctx.groups:
            for n, lin in zip(g.names, g.linears):
                if not self._selected(n):
                    continue
                idx = ctx.outliers(n)
                w_reg, w_out, perm = regular_weight(lin, idx)
                kq = w_reg.shape[1]
                h = hessian_of(ctx.stats[n])[perm][:, perm]
                qt, w_rest = adaround_quantize(
                    torch.cat([w_reg, w_out], 1), h, kq, ctx.weight_spec(n), n_steps=self.n_steps,
                    lr=self.lr, reg_weight=self.reg_weight,
                    beta=(float(self.beta[0]), float(self.beta[1])), warmup=self.warmup,
                    damp=self.damp, update_outliers=self.update_outliers)
                ctx.set_qweight(n, qt)
                if idx.numel() and self.update_outliers:
                    with torch.no_grad():
                        lin.weight[:, perm[kq:]] = w_rest.to(lin.weight.dtype)
