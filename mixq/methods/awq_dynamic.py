"""AWQ with dynamic group sizing: per group of linears, pick the weight group size too.

AWQ (Lin et al., MLSys 2024; `mixq.methods.awq`) searches a per-channel scale ``s`` for a fixed
weight group size. The best group size differs between linears: a weight matrix whose large
entries are spread over a few column groups (or an input whose salient channels cluster) gains a
lot from small groups, a flat one gains nothing. For each `LinearGroup` (linears sharing one
input, hence one folded ``s``) and each candidate group size ``g`` this method runs the AWQ
search (`awq_search`, reused as is) with the weights quantized in groups of ``g`` and scores it
by AWQ's W4A4 calibration loss::

    L(g) = min_s sum_i ||X W_i^T - Q_a(X / s) Q_{w,g}(W_i diag(s))^T||_F^2 / ||X W_i^T||_F^2

Trade-off: a group of ``g`` int4 weights carries one fp16 scale, i.e. ``16 / g`` extra bits per
weight (g = 32: +0.5 bit = 12.5% more weight bytes than the 4 bits; g = 128: +0.125 bit), and
the kernels read one more scale per ``g`` columns. Smaller groups essentially always lower L, so
``tolerance`` buys bytes back: the *largest* ``g`` with ``L(g) <= (1 + tolerance) * min_g L(g)``
wins. With ``tolerance = 0`` (default) the minimum wins, so when the fixed AWQ default (128) is a
candidate the chosen loss is never above fixed-group AWQ's.

Candidates: ``g`` must be a valid group size (16..4096). K (after removing FP16 outlier channels,
``Kq``) not divisible by ``g`` is zero-padded to a multiple of ``g`` exactly as `mixq.nn` and the
qweights convention do (``allow_padding=True``; ``g >= Kq`` is one group per row); with
``allow_padding=False`` only divisors of every linear's ``Kq`` are tried (if none divides, the
smallest candidate above ``Kq`` or else the largest candidate is used, padded).

The chosen spec goes to ``ctx.w_specs`` of the group's linears (``group_spec`` of their current
spec) and the scale is folded (`fold_scale`). Groups without a foldable producer (OPT fc2) still
get their group size chosen, with ``s = 1``. `choose_group_size` returns the per-candidate losses
for inspection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.methods.awq import _loss, awq_search, check_search_fields, group_spec
from mixq.methods.base import (LayerContext, check_int, check_number, float_output,
                               fold_scale, group_inputs)
from mixq.methods.smoothquant import GROUP_KINDS

__all__ = ["AWQDynamic", "choose_group_size", "scale_overhead_bits"]


def scale_overhead_bits(group_size: int, scale_bits: int = 16) -> float:
    """Extra bits per weight of one fp16 scale per `group_size` weights."""
    return scale_bits / group_size


def _valid_candidates(cands: tuple[int, ...], kqs: list[int], allow_padding: bool) -> list[int]:
    if allow_padding:
        return sorted(cands)
    ok = [g for g in cands if all(kq % g == 0 for kq in kqs)]
    if ok:
        return sorted(ok)
    above = [g for g in sorted(cands) if all(g >= kq for kq in kqs)]
    return [above[0] if above else max(cands)]


def choose_group_size(ctx: LayerContext, group, method: "AWQDynamic"
                      ) -> tuple[int, torch.Tensor, dict[int, float]]:
    """Search (group size, AWQ scale) for one LinearGroup; nothing is modified.

    Returns:
        ``(g, s (K,), {candidate: loss})``.
    """
    kqs = [lin.in_features - ctx.outliers(n).numel() for n, lin in zip(group.names, group.linears)]
    cands = _valid_candidates(method.candidates, kqs, method.allow_padding)
    foldable = group.prev_norm is not None or group.prev_linear is not None
    losses, scales = {}, {}
    if not foldable:
        x = group_inputs(ctx, group)[:method.max_rows]
        refs = [float_output(lin, x) for lin in group.linears]
        bits = (lambda n: ctx.act_bits(n)) if method.act_quant else (lambda n: None)
    for g in cands:
        specs = [group_spec(ctx.weight_spec(n), g) for n in group.names]
        if foldable:
            s, loss, _ = awq_search(ctx, group, specs=specs, n_grid=method.n_grid,
                                    percentile=method.percentile_threshold,
                                    importance=method.importance_threshold,
                                    scale_factor=method.scale_factor, act_quant=method.act_quant,
                                    max_rows=method.max_rows)
        else:
            s = torch.ones(x.shape[1], device=x.device)
            loss = _loss(ctx, group, x, s, specs, bits, refs)
        losses[g], scales[g] = loss, s
    best = min(losses.values())
    ok = [g for g in cands if losses[g] <= (1.0 + method.tolerance) * best]
    g = max(ok)
    return g, scales[g], losses


@dataclass(frozen=True)
class AWQDynamic:
    """AWQ whose weight group size is chosen per LinearGroup (module docstring).

    Args:
        candidates: group sizes tried (ints in 16..4096, distinct, non-empty).
        tolerance: relative loss slack (>= 0) traded for bigger groups (fewer scale bytes).
        allow_padding: also try sizes that do not divide Kq (zero-padded like `mixq.nn`).
        percentile_threshold, importance_threshold, scale_factor, n_grid, act_quant, kinds,
            max_rows: as in `mixq.methods.awq.AWQ`.
    """

    candidates: tuple[int, ...] = (32, 64, 128, 256)
    tolerance: float = 0.0
    allow_padding: bool = True
    percentile_threshold: float = 0.998
    importance_threshold: float = 0.95
    scale_factor: float = 1.0
    n_grid: int = 20
    act_quant: bool = True
    kinds: tuple[str, ...] = GROUP_KINDS
    max_rows: int = 512

    def __post_init__(self) -> None:
        if not isinstance(self.candidates, tuple) or not self.candidates:
            raise ValueError(f"AWQDynamic.candidates must be a non-empty tuple of ints, "
                             f"got {self.candidates!r}")
        for g in self.candidates:
            check_int(g, "AWQDynamic.candidates item", 16, 4096)
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"AWQDynamic.candidates must be distinct, got {self.candidates!r}")
        check_number(self.tolerance, "AWQDynamic.tolerance", 0.0, 10.0)
        if not isinstance(self.allow_padding, bool):
            raise ValueError(f"AWQDynamic.allow_padding must be a bool, got {self.allow_padding!r}")
        check_search_fields(self, "AWQDynamic")

    def apply(self, ctx: LayerContext) -> None:
        for grp in ctx.groups:
            if grp.kind not in self.kinds:
                continue
            g, s, _ = choose_group_size(ctx, grp, self)
            if grp.prev_norm is not None or grp.prev_linear is not None:
                fold_scale(ctx, grp, s)
            for n in grp.names:
                ctx.w_specs[n] = group_spec(ctx.weight_spec(n), g)
