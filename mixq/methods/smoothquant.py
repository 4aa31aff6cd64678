"""SmoothQuant: migrate activation outliers into the weights with a per-channel scale.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", ICML 2023. For linears sharing the input ``X (M, K)`` (weights ``W_i (N_i, K)``)::

    s_j = max|X_j|^alpha / max_i max_n |W_i[n, j]|^(1 - alpha)        (clamped to >= 1e-5)
    X W^T = (X diag(s)^-1) (W diag(s))^T

``alpha`` = 0.5 balances the channel ranges of activations and weights; larger alpha moves more
difficulty into the weights. ``X / s`` is folded into the previous RMSNorm/LayerNorm weight (and
bias) or the previous linear's output rows (`mixq.methods.base.fold_scale`), so the float
function is unchanged and inference costs nothing. Groups with no foldable producer (OPT fc2
after ReLU is foldable into fc1; a SwiGLU down_proj into up_proj) are skipped when
``skip_unfoldable`` is True, else they raise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.methods.base import LayerContext, check_choice, check_number, fold_scale, tie_scale

__all__ = ["SmoothQuant", "smooth_scale", "GROUP_KINDS"]

GROUP_KINDS = ("attn_in", "attn_out", "mlp_in", "mlp_out")


def smooth_scale(act_absmax: torch.Tensor, weights, alpha: float) -> torch.Tensor:
    """SmoothQuant scale (K,) fp32 from activation absmax (K,) and weights [(N_i, K), ...].

    ``s = act_absmax^alpha / w_absmax^(1-alpha)`` with both maxima clamped to >= 1e-5.
    """
    w_max = torch.stack([w.detach().abs().float().amax(0) for w in weights]).amax(0)
    a = act_absmax.float().clamp(min=1e-5)
    return (a.pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant(alpha) on the chosen group kinds.

    Args:
        alpha: migration strength in [0, 1].
        kinds: group kinds to smooth (default all four).
        skip_unfoldable: skip (True) or raise for groups with no norm / linear to fold into.
    """

    alpha: float = 0.5
    kinds: tuple[str, ...] = GROUP_KINDS
    skip_unfoldable: bool = True

    def __post_init__(self) -> None:
        check_number(self.alpha, "SmoothQuant.alpha", 0.0, 1.0)
        if not isinstance(self.kinds, tuple) or not self.kinds:
            raise ValueError(f"SmoothQuant.kinds must be a non-empty tuple, got {self.kinds!r}")
        for k in self.kinds:
            check_choice(k, "SmoothQuant.kinds item", GROUP_KINDS)

    def apply(self, ctx: LayerContext) -> None:
        for g in ctx.groups:
            if g.kind not in self.kinds:
                continue
            if g.prev_norm is None and g.prev_linear is None:
                if self.skip_unfoldable:
                    continue
                raise ValueError(f"SmoothQuant: group {g.kind!r} has no producer to fold into")
            st = ctx.stats[g.names[0]]
            s = smooth_scale(st.absmax, [lin.weight for lin in g.linears], self.alpha)
            fold_scale(ctx, g, tie_scale(ctx, g, s))
