"""The one named catalogue of `QuantConfig`s: a name means the same config everywhere.

The sweep (``python -m mixq sweep``), the full-architecture steps (``python -m mixq full``),
the end-to-end benchmark (``python -m mixq bench e2e --modes``), ``python -m mixq quantize
--preset`` and notebook 03 all take their configs from `PRESETS` through `preset(name)`::

    cfg = mixq.preset("w4a4-o1+rotation+gptq")          # a linear recipe
    cfg = mixq.preset("w4a4-o1+rotation+gptq+kv4+attn")  # + the full-architecture steps

Names: ``<mode>[-g<group>|-row]`` for plain RTN, ``-o<percent>`` for that fraction of each
linear's input channels kept in FP16 (ranked by calibration max |x|; ``-o1-salient`` ranks by
weight magnitude instead and needs no calibration data), then ``+<method>`` for each PTQ method
applied in order. A name may end in any of the full-architecture steps of `STEPS`, cumulative
in that order: ``+kv4`` (the 4-bit KV cache of `KV4`), ``+attn`` (the quantized attention
matmuls of `INT8_ATTENTION`), ``+norm`` (pre-norms fused with the activation quantization),
``+fuse`` (q/k/v and gate/up each as one GEMM: ``fuse_projections``).

`PRESETS` is ordered by importance (the accuracy targets first), so a time-capped sweep reports
the rows that matter most. SmolLM2's weights came as GGUF Q4_1 (asymmetric groups of 32): a
weight grid of that kind is lossless on them, so weight-only presets use other granularities
(g128 with K=576 zero-padded, g64, g192, per channel); see data/MANIFEST.md.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mixq.config import AttentionQuantConfig, KVCacheSpec, QuantConfig, QuantSpec
from mixq.methods import (AWQ, GPTQ, Clip, LayerwiseQuant, OutlierChannels, Rotation,
                          SmoothQuant)

__all__ = ["Preset", "PRESETS", "STEPS", "ALL_STEPS", "KV4", "INT8_ATTENTION", "preset", "preset_names",
           "describe"]


@dataclass(frozen=True)
class Preset:
    """One named entry of the catalogue.

    Attributes:
        name: the name `preset` looks up.
        config: the `QuantConfig`.
        method: label of the methods applied, in order ("RTN" when none), for tables.
        note: why the entry is there (a target, a comparison, ...).
    """

    name: str
    config: QuantConfig
    method: str = "RTN"
    note: str = ""


#: The 4-bit KV cache of the "+kv4" step: K per channel over groups of 32 tokens, V per token.
KV4 = KVCacheSpec(bits=4, group_size=32)
#: The quantized attention of the "+attn" step: Q, K, V int8 per head and token, P uint8.
INT8_ATTENTION = AttentionQuantConfig(q_bits=8, k_bits=8, v_bits=8, p_bits=8)
#: Full-architecture steps that change what the model computes (the accuracy steps of
#: ``python -m mixq full``), cumulative in this order.
STEPS: tuple[str, ...] = ("kv4", "attn", "norm")
#: Every step a preset name may end in, in this order: `STEPS`, then the speed-only ones
#: ("fuse": q/k/v and gate/up as one GEMM each, same outputs up to fp32 rounding).
ALL_STEPS: tuple[str, ...] = (*STEPS, "fuse")


def _w4(g: int | None) -> QuantSpec:
    """int4 symmetric weights, groups of g (None: one scale per output channel)."""
    return QuantSpec(4, True, "row") if g is None else QuantSpec(4, True, "group", g)


def _p(name: str, method: str = "RTN", note: str = "", **fields) -> Preset:
    return Preset(name, QuantConfig(**fields), method, note)


_SQ, _AWQ, _GPTQ, _ROT, _CLIP = SmoothQuant(alpha=0.5), AWQ(), GPTQ(), Rotation(), Clip()

_CATALOGUE: list[Preset] = [
    # -- the accuracy targets
    _p("w8a8", mode="w8a8", note="target: <= +1% of FP16"),
    _p("w8a8-smoothquant", "SmoothQuant", mode="w8a8", methods=(_SQ,),
       note="classic W8A8 fix for activation outliers"),
    _p("w4a16-g128", mode="w4a16", w=_w4(128), note="target: <= +10%; K=576 padded"),
    _p("w4a4-rtn", mode="w4a4"),
    _p("w4a4-o1", mode="w4a4", outlier_frac=0.01, note="1% FP16 channels (calib max)"),
    _p("w4a4-rotation+gptq", "Rotation+GPTQ", mode="w4a4", methods=(_ROT, _GPTQ)),
    _p("w4a4-o1+gptq", "GPTQ", mode="w4a4", outlier_frac=0.01, methods=(_GPTQ,)),
    _p("w4a4-smoothquant+gptq", "SmoothQuant+GPTQ", mode="w4a4", methods=(_SQ, _GPTQ)),
    _p("w4a4-o1+rotation+gptq", "Rotation+GPTQ", mode="w4a4", outlier_frac=0.01,
       methods=(_ROT, _GPTQ)),
    # -- each method alone (W4A4, no outliers unless the method picks them)
    _p("w4a4-gptq", "GPTQ", mode="w4a4", methods=(_GPTQ,)),
    _p("w4a4-smoothquant", "SmoothQuant", mode="w4a4", methods=(_SQ,)),
    _p("w4a4-awq", "AWQ", mode="w4a4", methods=(_AWQ,)),
    _p("w4a4-rotation", "Rotation", mode="w4a4", methods=(_ROT,)),
    _p("w4a4-clip", "Clip", mode="w4a4", methods=(_CLIP,)),
    _p("w4a4-outlierchannels", "OutlierChannels", mode="w4a4",
       methods=(OutlierChannels(fraction=0.01),), note="method: 1% FP16 channels"),
    _p("w4a4-layerwise-down8", "LayerwiseQuant", mode="w4a4",
       methods=(LayerwiseQuant(kinds=("down",)),), note="down_proj at W8A8"),
    # -- outlier fraction sweep (0% is w4a4-rtn, 1% is w4a4-o1)
    _p("w4a4-o0.5", mode="w4a4", outlier_frac=0.005),
    _p("w4a4-o2", mode="w4a4", outlier_frac=0.02),
    _p("w4a4-o5", mode="w4a4", outlier_frac=0.05),
    _p("w4a4-o0.5+gptq", "GPTQ", mode="w4a4", outlier_frac=0.005, methods=(_GPTQ,)),
    _p("w4a4-o2+gptq", "GPTQ", mode="w4a4", outlier_frac=0.02, methods=(_GPTQ,)),
    _p("w4a4-o5+gptq", "GPTQ", mode="w4a4", outlier_frac=0.05, methods=(_GPTQ,)),
    # -- more combinations
    _p("w4a4-o1+smoothquant+gptq", "SmoothQuant+GPTQ", mode="w4a4", outlier_frac=0.01,
       methods=(_SQ, _GPTQ)),
    _p("w4a4-awq+gptq", "AWQ+GPTQ", mode="w4a4", methods=(_AWQ, _GPTQ)),
    _p("w4a4-rotation+clip", "Rotation+Clip", mode="w4a4", methods=(_ROT, _CLIP)),
    # -- weight-only granularities (Q4_1 g32 asym would be lossless on this GGUF)
    _p("w4a16-g64", mode="w4a16", w=_w4(64)),
    _p("w4a16-g192", mode="w4a16", w=_w4(192), note="192 divides K=576 and 1536"),
    _p("w4a16-row", mode="w4a16", w=_w4(None), note="one scale per output channel"),
    _p("w4a16-g128+gptq", "GPTQ", mode="w4a16", w=_w4(128), methods=(_GPTQ,)),
    _p("w4a16-g64+gptq", "GPTQ", mode="w4a16", w=_w4(64), methods=(_GPTQ,)),
    # -- speed: outliers without calibration data (random-weight benchmark models)
    _p("w4a4-o1-salient", mode="w4a4", outlier_frac=0.01, outlier_strategy="max",
       note="1% FP16 channels ranked by weight magnitude (no calibration data)"),
]

#: name -> `Preset`, in catalogue order (the sweep's order).
PRESETS: dict[str, Preset] = {p.name: p for p in _CATALOGUE}


def _with_step(config: QuantConfig, step: str) -> QuantConfig:
    if step == "kv4":
        return dataclasses.replace(config, kv_cache=KV4)
    if step == "attn":
        return dataclasses.replace(config, attention=INT8_ATTENTION)
    if step == "fuse":
        return dataclasses.replace(config, fuse_projections=True)
    return dataclasses.replace(config, fuse_norm=True)


def _split(name: str) -> tuple[str, tuple[str, ...]]:
    """``"w4a4-o1+gptq+kv4+attn"`` -> ``("w4a4-o1+gptq", ("kv4", "attn"))``."""
    steps: list[str] = []
    base = name
    while "+" in base and base.rsplit("+", 1)[1] in ALL_STEPS:
        base, step = base.rsplit("+", 1)
        steps.insert(0, step)
    return base, tuple(steps)


def preset(name: str) -> QuantConfig:
    """The `QuantConfig` named `name`: a key of `PRESETS`, optionally followed by
    full-architecture steps (``+kv4``, ``+attn``, ``+norm``, ``+fuse``, in that order).

    Raises:
        ValueError: unknown name (the message lists the known ones), or steps out of order.
    """
    if not isinstance(name, str):
        raise TypeError(f"preset name must be a str, got {type(name).__name__}")
    base, steps = _split(name)
    if base not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {preset_names()} (each may end in "
                         f"+{'+'.join(ALL_STEPS)})")
    order = [ALL_STEPS.index(s) for s in steps]
    if order != sorted(order) or len(set(order)) != len(order):
        raise ValueError(f"preset {name!r}: full-architecture steps must appear once each, in "
                         f"the order {ALL_STEPS}")
    config = PRESETS[base].config
    for step in steps:
        config = _with_step(config, step)
    return config


def preset_names() -> list[str]:
    """The names of `PRESETS`, in catalogue order."""
    return list(PRESETS)


def describe(name: str) -> dict:
    """Table columns of a preset: name, method label, note, mode, w/a bits and specs, outlier
    fraction (that of an `OutlierChannels` method when it picks its own), steps."""
    base, steps = _split(name)
    cfg = preset(name)
    entry = PRESETS[base]
    w, a = cfg.w, cfg.a
    frac = cfg.outlier_frac
    for m in cfg.methods:
        if isinstance(m, OutlierChannels) and m.fraction is not None:
            frac = m.fraction
    return {"config": name, "method": entry.method, "note": entry.note, "mode": cfg.mode,
            "w_bits": None if w is None else w.bits, "a_bits": None if a is None else a.bits,
            "w_spec": None if w is None else w.describe(),
            "a_spec": None if a is None else a.describe(), "outlier_frac": frac,
            "steps": list(steps)}
