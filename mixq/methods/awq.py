"""AWQ: activation-aware per-channel scaling, searched on the W4A4 output error.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
MLSys 2024. Weights that see large activations matter most; scaling those input channels up in
W (and down in X) protects them::

    X W^T = (X diag(s)^-1) (W diag(s))^T,      s_j = xbar_j^r / wbar_j^(1-r),  r in [0, 1)

``xbar_j`` is an activation statistic of channel j (here the `percentile_threshold` quantile
of ``|X_j|`` over calibration tokens, a robust max), ``wbar_j`` the mean over output rows of
``|W[n, j]| / absmax(group of W[n, j])``. ``s`` is normalized to geometric mean 1 over the
channels it scales. The exponent ``r`` is chosen on a grid of `n_grid` points by the loss::

    L(s) = sum_i ||X W_i^T - Q_a(X / s) Q_w(W_i diag(s))^T||_F^2 / ||X W_i^T||_F^2

Original AWQ is weight-only (Q_a = identity). With 4-bit activations the best scales differ:
shrinking activation outliers also helps Q_a (the AWQ-W4A4 finding, SmoothQuant's insight), so
``act_quant=True`` (default) puts per-token activation quantization in the loss. ``s = 1``
(no scaling) is always a candidate, so AWQ never increases the calibration loss.

Seed API: ``AWQ(group_size=128, percentile_threshold=0.998, importance_threshold=0.95,
scale_factor=1.0)``:

* group_size: weight group size the scales are searched for; it also becomes the weight spec
  (``ctx.w_specs``) of the processed linears (None keeps ``ctx.weight_spec``). K not divisible by
  it is zero-padded, as in `mixq.nn` (K <= group_size = one group per row).
* percentile_threshold: quantile in (0, 1] for ``xbar`` (1.0 = max |X_j|).
* importance_threshold: quantile in [0, 1) of ``xbar``; only channels at or above it are scaled
  (0.95: the top 5%, AWQ's "1% salient channels" idea); 0 scales every channel (classic AWQ).
* scale_factor: exponent applied to the searched scale, ``s <- s^scale_factor`` (1 = as searched).

The scales are folded into the previous norm / linear (`mixq.methods.base.fold_scale`); groups
without one are skipped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mixq.config import QuantSpec
from mixq.methods.base import (LayerContext, check_choice, check_int, check_number, fold_scale,
                               group_inputs, quantized_output, float_output, tie_scale)
from mixq.quant import expand_blocks, quantize
from mixq.methods.smoothquant import GROUP_KINDS

__all__ = ["AWQ", "awq_search", "group_spec"]


def group_spec(spec: QuantSpec, group_size: int | None) -> QuantSpec:
    """`spec` with granularity "group" and `group_size` (unchanged when None)."""
    if group_size is None:
        return spec
    return dataclasses.replace(spec, granularity="group", group_size=group_size)


def _w_stat(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """mean_n |W[n, j]| / absmax(block of W[n, j]) -> (K,)."""
    n, k = w.shape
    from mixq.methods.base import _pad
    wp = _pad(w.abs(), spec)
    qt = quantize(wp, spec, scale_dtype=torch.float32)
    amax = expand_blocks(qt.scale.float() * spec.qmax, wp.shape, spec)
    return (wp / amax.clamp(min=1e-12))[:n, :k].mean(0)


def _loss(ctx: LayerContext, group, x: torch.Tensor, s: torch.Tensor, specs, act_bits,
          refs) -> float:
    total = 0.0
    xs = x / s
    for n, lin, spec, ref in zip(group.names, group.linears, specs, refs):
        w = lin.weight.detach().float() * s
        tmp = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None)
        with torch.no_grad():
            tmp.weight.copy_(w)
            if lin.bias is not None:
                tmp.bias.copy_(lin.bias.float())
        y = quantized_output(tmp, xs, w_spec=spec, act_bits=act_bits(n), outlier_idx=ctx.outliers(n))
        total += float(((y - ref) ** 2).sum() / (ref ** 2).sum().clamp(min=1e-30))
    return total


def awq_search(ctx: LayerContext, group, *, specs, n_grid: int = 20, percentile: float = 0.998,
               importance: float = 0.95, scale_factor: float = 1.0, act_quant: bool = True,
               max_rows: int = 512) -> tuple[torch.Tensor, float, float]:
    """Search the AWQ scale of one group (nothing is modified).

    Args:
        ctx: layer context; group: a LinearGroup; specs: one weight QuantSpec per linear.
        n_grid, percentile, importance, scale_factor, act_quant: see `AWQ`.
        max_rows: calibration rows used by the loss (the first `max_rows`).
    Returns:
        ``(s (K,) fp32, best loss, loss of s = 1)``.
    """
    x = group_inputs(ctx, group)[:max_rows]
    k = x.shape[1]
    refs = [float_output(lin, x) for lin in group.linears]
    bits = (lambda n: ctx.act_bits(n)) if act_quant else (lambda n: None)
    xa = x.abs()
    x_stat = (xa.amax(0) if percentile >= 1.0 else torch.quantile(xa, percentile, dim=0)).clamp(min=1e-6)
    w_stat = torch.stack([_w_stat(lin.weight.detach().float(), sp)
                          for lin, sp in zip(group.linears, specs)]).mean(0).clamp(min=1e-6)
    mask = x_stat >= torch.quantile(x_stat, importance) if importance > 0 else torch.ones(k, dtype=torch.bool, device=x_stat.device)
    ones = torch.ones(k, device=x.device)
    base = _loss(ctx, group, x, ones, specs, bits, refs)
    best, best_s = base, ones
    for i in range(n_grid):
        r = i / n_grid
        s = x_stat.pow(r) / w_stat.pow(1 - r)
        s = torch.where(mask, s / s[mask].log().mean().exp(), ones).pow(scale_factor)
        s = tie_scale(ctx, group, s)
        loss = _loss(ctx, group, x, s, specs, bits, refs)
        if loss < best:
            best, best_s = loss, s
    return best_s, best, base


def check_search_fields(cfg, name: str) -> None:
    """Validate the scale-search fields that AWQ and AWQDynamic share (ValueError names them)."""
    check_number(cfg.percentile_threshold, f"{name}.percentile_threshold", 0.0, 1.0,
                 lo_open=True)
    check_number(cfg.importance_threshold, f"{name}.importance_threshold", 0.0, 1.0,
                 hi_open=True)
    check_number(cfg.scale_factor, f"{name}.scale_factor", 0.0, 4.0, lo_open=True)
    check_int(cfg.n_grid, f"{name}.n_grid", 2, 100)
    check_int(cfg.max_rows, f"{name}.max_rows", 16)
    if not isinstance(cfg.act_quant, bool):
        raise ValueError(f"{name}.act_quant must be a bool, got {cfg.act_quant!r}")
    if not isinstance(cfg.kinds, tuple) or not cfg.kinds:
        raise ValueError(f"{name}.kinds must be a non-empty tuple, got {cfg.kinds!r}")
    for kd in cfg.kinds:
        check_choice(kd, f"{name}.kinds item", GROUP_KINDS)


@dataclass(frozen=True)
class AWQ:
    """AWQ scale search (see module docstring for every argument).

    Args:
        group_size: int 16..4096 or None. percentile_threshold: (0, 1].
        importance_threshold: [0, 1). scale_factor: (0, 4]. n_grid: 2..100 search points.
        act_quant: include per-token activation quantization in the loss (W4A4 objective).
        kinds: group kinds to process. max_rows: calibration rows in the loss (>= 16).
    """

    group_size: int | None = 128
    percentile_threshold: float = 0.998
    importance_threshold: float = 0.95
    scale_factor: float = 1.0
    n_grid: int = 20
    act_quant: bool = True
    kinds: tuple[str, ...] = GROUP_KINDS
    max_rows: int = 512

    def __post_init__(self) -> None:
        if self.group_size is not None:
            check_int(self.group_size, "AWQ.group_size", 16, 4096)
        check_search_fields(self, "AWQ")

    def apply(self, ctx: LayerContext) -> None:
        for g in ctx.groups:
            if g.kind not in self.kinds or (g.prev_norm is None and g.prev_linear is None):
                continue
            specs = [group_spec(ctx.weight_spec(n), self.group_size) for n in g.names]
            s, _, _ = awq_search(ctx, g, specs=specs, n_grid=self.n_grid,
                                 percentile=self.percentile_threshold,
                                 importance=self.importance_threshold,
                                 scale_factor=self.scale_factor, act_quant=self.act_quant,
                                 max_rows=self.max_rows)
            fold_scale(ctx, g, s)
            for n, sp in zip(g.names, specs):
                ctx.w_specs[n] = sp
