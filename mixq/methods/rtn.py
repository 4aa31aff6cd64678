"""RTN: round-to-nearest weight quantization, the baseline every other method is measured against.

Math (per block B of the spec, see `mixq.quant.quantize`)::

    s = fp16(absmax(B) / qmax),   q = clamp(round(w / s), qmin, qmax)

RTN needs no calibration data. Linears without a ``ctx.qweights`` entry get RTN anyway; this
method makes the choice explicit (and fills ``ctx.qweights`` so the result can be inspected).
Reference: e.g. Nagel et al., "A White Paper on Neural Network Quantization", 2021, section 2.
"""
from __future__ import annotations

from dataclasses import dataclass

from mixq.methods.base import LayerContext, check_choice, regular_weight, quantize_weight

__all__ = ["RTN"]


@dataclass(frozen=True)
class RTN:
    """Round-to-nearest for every linear of the layer (``kinds`` None) or only some group kinds.

    Args:
        kinds: None, or a tuple of group kinds ("attn_in", "attn_out", "mlp_in", "mlp_out").
    """

    kinds: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kinds is not None:
            if not isinstance(self.kinds, tuple) or not self.kinds:
                raise ValueError(f"RTN.kinds must be None or a non-empty tuple, got {self.kinds!r}")
            for k in self.kinds:
                check_choice(k, "RTN.kinds item", ("attn_in", "attn_out", "mlp_in", "mlp_out"))

    def quantizes_weight(self, name: str, group_kind: str) -> bool:
        """Whether `apply` hands the linear `name` (within its layer; LinearGroup kind
        `group_kind`) method-quantized int4 weights (``ctx.qweights``): those of the group `kinds` (None: all)."""
        return self.kinds is None or group_kind in self.kinds

    def apply(self, ctx: LayerContext) -> None:
        for g in ctx.groups:
            if self.kinds is not None and g.kind not in self.kinds:
                continue
            for n, lin in zip(g.names, g.linears):
                w_reg, _, _ = regular_weight(lin, ctx.outliers(n))
                ctx.set_qweight(n, quantize_weight(w_reg, ctx.weight_spec(n)))
