"""Layer-wise mixed precision: chosen linears (by kind and/or layer index) at higher precision.

Sensitivity to quantization differs across layers: in LLMs the down projections (which see the
widest, most outlier-heavy activations) and the first/last blocks are the usual suspects
(e.g. LLM.int8()'s analysis; "layer-wise sensitivity" in Dong et al., HAWQ, ICCV 2019). A cheap
remedy keeps them at W8A8 while the rest stays W4A4: bytes grow by
``(8 - 4) / 8 * params(selected)``, error drops where it is largest (see `mixq.methods.ablation`
to measure which kinds/blocks to choose).

For each selected linear: ``ctx.w_specs[name] = QuantSpec(bits, True, "row")`` and
``ctx.a_bits[name] = act_bits``. Everything else keeps the config's spec.
"""
from __future__ import annotations

from dataclasses import dataclass

from mixq.config import TARGETS, QuantSpec
from mixq.methods.base import LayerContext, check_choice, check_int, linear_kind

__all__ = ["LayerwiseQuant"]


@dataclass(frozen=True)
class LayerwiseQuant:
    """Select linears for higher precision.

    Args:
        kinds: linear kinds among TARGETS ("q","k","v","o","gate","up","down"); OPT fc1/fc2
            count as "up"/"down", out_proj as "o".
        layers: None (every layer) or a tuple of layer indices (>= 0) to which `kinds` apply.
        bits: weight bits of the selected linears (2..8, per-row symmetric).
        act_bits: activation bits of the selected linears (2..8), or None for float activations.
    """

    kinds: tuple[str, ...] = ("down",)
    layers: tuple[int, ...] | None = None
    bits: int = 8
    act_bits: int | None = 8

    def __post_init__(self) -> None:
        if not isinstance(self.kinds, tuple) or not self.kinds:
            raise ValueError(f"LayerwiseQuant.kinds must be a non-empty tuple, got {self.kinds!r}")
        for kd in self.kinds:
            check_choice(kd, "LayerwiseQuant.kinds item", TARGETS)
        if self.layers is not None:
            if not isinstance(self.layers, tuple) or not self.layers:
                raise ValueError(f"LayerwiseQuant.layers must be None or a non-empty tuple, got {self.layers!r}")
            for i in self.layers:
                check_int(i, "LayerwiseQuant.layers item", 0)
        check_int(self.bits, "LayerwiseQuant.bits", 2, 8)
        if self.act_bits is not None:
            check_int(self.act_bits, "LayerwiseQuant.act_bits", 2, 8)

    def selects(self, name: str, index: int | None) -> bool:
        """True when linear `name` of layer `index` is selected."""
        if self.layers is not None and index not in self.layers:
            return False
        return linear_kind(name) in self.kinds

    def apply(self, ctx: LayerContext) -> None:
        for n in ctx.names():
            if self.selects(n, ctx.index):
                if n in ctx.qweights:
                    raise ValueError(f"{n!r} already has quantized weights: run LayerwiseQuant first")
                ctx.w_specs[n] = QuantSpec(self.bits, True, "row")
                ctx.a_bits[n] = self.act_bits
