"""Outlier / salient input channels kept in FP16 next to the int4 ones (mixed precision).

LLM.int8() (Dettmers et al., NeurIPS 2022) keeps the few activation channels with magnitudes
>= 6 in FP16; "salient weight" variants (AWQ's 1% salient channels, Lin et al. 2024; MixedQuant
seed) rank channels by the weights instead. For a linear with outlier set O (k channels)::

    y = Q_a(x[:, ~O]) Q_w(W[:, ~O])^T  +  fp16(x[:, O]) fp16(W[:, O])^T

so the outliers no longer set the per-token activation scale. Strategies:

* "calib_max": the k channels with the largest calibration ``max |x_j|`` (static activation
  outliers, `mixq.outliers.outliers_topk` on ``stats.absmax``);
* "max" / "mean3std" / "argmax": salient weight channels (`mixq.outliers.salient_weight_channels`).

``k = ceil(fraction * K)`` (or `k`). The int4 part may use its own weight group size
(``group_size`` 64..1024, written to ``ctx.w_specs``). The choice goes to ``ctx.outlier_idx``;
run this before weight quantizers (GPTQ/clip need to know the int4 columns).
"""
from __future__ import annotations

from dataclasses import dataclass

from mixq.methods.awq import group_spec
from mixq.methods.base import LayerContext, check_choice, check_int, check_number
from mixq.outliers import SALIENT_STRATEGIES, outliers_topk, salient_weight_channels

__all__ = ["OutlierChannels", "OUTLIER_STRATEGIES"]

OUTLIER_STRATEGIES = ("calib_max",) + SALIENT_STRATEGIES


@dataclass(frozen=True)
class OutlierChannels:
    """Choose FP16 outlier input channels per linear.

    Args:
        fraction: fraction of input channels in (0, 0.5] (at most one of fraction / k; neither
            means fraction 0.01).
        k: number of channels, >= 1.
        strategy: one of OUTLIER_STRATEGIES.
        group_size: None or int 64..1024: weight group size of the int4 part.
    """

    fraction: float | None = None
    k: int | None = None
    strategy: str = "calib_max"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.fraction is None and self.k is None:
            object.__setattr__(self, "fraction", 0.01)
        if (self.fraction is None) == (self.k is None):
            raise ValueError(f"OutlierChannels: give exactly one of fraction and k, got "
                             f"fraction={self.fraction!r}, k={self.k!r}")
        if self.fraction is not None:
            check_number(self.fraction, "OutlierChannels.fraction", 0.0, 0.5, lo_open=True)
        if self.k is not None:
            check_int(self.k, "OutlierChannels.k", 1)
        check_choice(self.strategy, "OutlierChannels.strategy", OUTLIER_STRATEGIES)
        if self.group_size is not None:
            check_int(self.group_size, "OutlierChannels.group_size", 64, 1024)

    def apply(self, ctx: LayerContext) -> None:
        for g in ctx.groups:
            for n, lin in zip(g.names, g.linears):
                if n in ctx.qweights:
                    raise ValueError(f"{n!r} already has quantized weights: choose outliers first")
                kk = lin.in_features
                if self.k is not None and self.k >= kk:
                    raise ValueError(f"OutlierChannels.k={self.k} must be < in_features {kk} of {n!r}")
                if self.strategy == "calib_max":
                    idx = outliers_topk(ctx.stats[n].absmax.float().cpu(), k=self.k, fraction=self.fraction)
                else:
                    frac = self.fraction if self.fraction is not None else self.k / kk
                    idx = salient_weight_channels(lin.weight.detach().cpu(), frac, self.strategy)
                ctx.outlier_idx[n] = idx
                if self.group_size is not None:
                    ctx.w_specs[n] = group_spec(ctx.weight_spec(n), self.group_size)
