"""Dataclass configs: *what* to quantize and *how*, separate from the code that does it.

`QuantSpec` describes one uniform quantizer (bits, symmetric or not, granularity). Every
quantizer in mixq -- the fake-quant reference, the Triton kernels, the PTQ methods -- takes a
`QuantSpec`, so a spec means the same grid everywhere. `QuantConfig` says how a whole model is
quantized (linears, plus the full-architecture parts: `AttentionQuantConfig` of the quantized
attention, `KVCacheSpec` of the KV cache, fused norms). `QuantConfig` is the one config of a
model; `mixq.presets` names the ones the project measures.

This module imports neither torch nor transformers (``import mixq`` stays light).
"""
from __future__ import annotations

import dataclasses as _dc
import importlib as _importlib
from dataclasses import dataclass
from typing import Any as _Any
from typing import Literal

Granularity = Literal["tensor", "row", "group", "tile"]
GRANULARITIES: tuple[str, ...] = ("tensor", "row", "group", "tile")


@dataclass(frozen=True)
class QuantSpec:
    """One uniform round-to-nearest quantizer.

    Args:
        bits: integer width, 2..8 (4 and 8 are the ones kernels implement).
        symmetric: True -> signed grid [-2^(b-1), 2^(b-1)-1] with scale = absmax / (2^(b-1)-1)
            and no zero point; False -> unsigned grid [0, 2^b-1] with a zero point.
        granularity: which elements share one scale, for a 2-D tensor (rows, cols) = (N, K):
            "tensor" one scale; "row" one per row (per output channel of a weight, per token of
            an activation); "group" one per `group_size` consecutive elements of a row;
            "tile" one per `tile` = (tile_rows, tile_cols) block.
        group_size: elements per group along the last dim (granularity="group"), 16..4096.
        tile: (rows, cols) of one tile (granularity="tile"); must divide the matrix.
    """

    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = "row"
    group_size: int = 128
    tile: tuple[int, int] = (8, 8)

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be an int in 2..8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group" and not (
                isinstance(self.group_size, int) and 16 <= self.group_size <= 4096):
            raise ValueError(f"QuantSpec.group_size must be an int in 16..4096, got {self.group_size!r}")
        if self.granularity == "tile":
            if (len(self.tile) != 2 or not all(isinstance(t, int) and t > 0 for t in self.tile)):
                raise ValueError(f"QuantSpec.tile must be two positive ints, got {self.tile!r}")

    @property
    def qmin(self) -> int:
        """Smallest integer on the grid."""
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest integer on the grid."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    @property
    def block_cols(self) -> int:
        """Columns (along K) that share one scale, the unit a weight's K is zero-padded to:
        `group_size` ("group"), the tile width ("tile"), 1 ("row", "tensor")."""
        return {"group": self.group_size, "tile": self.tile[1]}.get(self.granularity, 1)

    def describe(self) -> str:
        """Short human name, e.g. 'int4-sym-g128' or 'int8-asym-row'."""
        kind = {"tensor": "tensor", "row": "row", "group": f"g{self.group_size}",
                "tile": f"tile{self.tile[0]}x{self.tile[1]}"}[self.granularity]
        return f"int{self.bits}-{'sym' if self.symmetric else 'asym'}-{kind}"


KV_BITS: tuple[int, ...] = (4, 8)


def _check_int(name: str, v: _Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")


@dataclass(frozen=True)
class KVCacheSpec:
    """How `mixq.api.make_cache` builds the KV cache of a quantized model (`mixq.hf.kv_cache.KV4Cache`).

    Args:
        bits: 4 (codes packed two per byte) or 8. Keys: symmetric per channel over groups of
            `group_size` tokens (KIVI); values: symmetric per token; fp16 scales.
        group_size: G >= 1 tokens per key scale; the newest ``T mod G`` tokens stay in float
            (the residual window) until their group is complete.
    """

    bits: int = 4
    group_size: int = 32

    def __post_init__(self) -> None:
        _check_int("KVCacheSpec.bits", self.bits)
        _check_int("KVCacheSpec.group_size", self.group_size)
        if self.bits not in KV_BITS:
            raise ValueError(f"KVCacheSpec.bits must be one of {KV_BITS}, got {self.bits!r}")
        if self.group_size < 1:
            raise ValueError(f"KVCacheSpec.group_size must be an int >= 1, got {self.group_size!r}")

    def to_dict(self) -> dict:
        """{"bits", "group_size"} (JSON-able)."""
        return {"bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_dict(cls, d: dict) -> "KVCacheSpec":
        """Inverse of `to_dict`; unknown keys or bad values raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"KVCacheSpec.from_dict needs a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {"bits", "group_size"})
        if unknown:
            raise ValueError(f"KVCacheSpec.from_dict: unknown keys {unknown} "
                             "(known: ['bits', 'group_size'])")
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"KVCacheSpec.from_dict: {e}") from None


# ---------------------------------------------------------------------------------------------
# AttentionQuantConfig: bit widths of the quantized attention
# ---------------------------------------------------------------------------------------------

_QKV_BITS = (4, 8, None)
_P_BITS = (4, 8, None)


def _check_bits(name: str, value, allowed) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class AttentionQuantConfig:
    """Bit widths of the quantized attention (the math: `mixq.reference.attention`).

    Args:
        q_bits / k_bits / v_bits: 4 or 8 (symmetric, one fp16 scale per (b, head, token) row of
            D), or None to keep the tensor in float. With a `mixq.hf.kv_cache.KV4Cache` the
            cache's own quantization replaces k_bits / v_bits for the cached (decode) tokens.
        p_bits: 8 (default, unsigned codes 0..255) or 4 (0..15) for the probabilities, or None
            to keep them in fp32.
        use_kernels: None = Triton kernels on CUDA tensors, the reference elsewhere; True =
            always the kernels (CPU only under TRITON_INTERPRET=1); False = always the reference.
    """

    q_bits: int | None = 8
    k_bits: int | None = 8
    v_bits: int | None = 8
    p_bits: int | None = 8
    use_kernels: bool | None = None

    def __post_init__(self) -> None:
        for name in ("q_bits", "k_bits", "v_bits"):
            _check_bits(f"AttentionQuantConfig.{name}", getattr(self, name), _QKV_BITS)
        _check_bits("AttentionQuantConfig.p_bits", self.p_bits, _P_BITS)
        if self.use_kernels not in (None, True, False):
            raise TypeError(f"AttentionQuantConfig.use_kernels must be None, True or False, "
                            f"got {self.use_kernels!r}")

    @property
    def int_qk(self) -> bool:
        """True when S is computed on integer codes (both Q and K quantized)."""
        return self.q_bits is not None and self.k_bits is not None

    def kernels_for(self, t) -> bool:
        """Whether the Triton kernels run for an operand `t` (a torch.Tensor) under this config."""
        if self.use_kernels is None:
            return t.device.type == "cuda"
        return self.use_kernels


FLOAT_ATTENTION = AttentionQuantConfig(None, None, None, None)
"""No rounding anywhere: fp32 softmax attention (equals HF eager for fp32 models)."""


def _attention_to_dict(cfg: _Any) -> "dict | None":
    return None if cfg is None else {f.name: getattr(cfg, f.name) for f in _dc.fields(cfg)}


def _attention_from_dict(d: "dict | None") -> _Any:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ValueError(f"QuantConfig.attention must be a dict of AttentionQuantConfig fields "
                         f"or null, got {d!r}")
    cls = AttentionQuantConfig
    known = {f.name for f in _dc.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"QuantConfig.attention: unknown keys {unknown} (known: {sorted(known)})")
    try:
        return cls(**d)
    except TypeError as e:      # AttentionQuantConfig raises TypeError for wrong value types
        raise ValueError(f"QuantConfig.attention: {e}") from None


# ---------------------------------------------------------------------------------------------
# QuantConfig: how a whole model is quantized (mixq.quantize)
# ---------------------------------------------------------------------------------------------

MODES: tuple[str, ...] = ("w4a4", "w4a16", "w8a8", "fp16", "bf16")
"""What a quantized linear computes: int4 x int4 (+ FP16 outliers), weight-only int4, int8 x
int8, or a half-precision baseline (the linears cast to fp16 / bf16)."""
FLOAT_MODES: tuple[str, ...] = ("fp16", "bf16")
OUTLIER_STRATEGIES: tuple[str, ...] = ("calib_max", "max", "mean3std", "argmax")
#: The linear kinds of a decoder layer (`mixq.hf.models.linear_kind`): what `QuantConfig.targets`
#: names. OPT's out_proj, fc1 and fc2 are the kinds o, up and down.
TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
#: OPT's names of its kinds, accepted in `QuantConfig.targets` (and in configs saved before
#: the kinds had one vocabulary).
TARGET_ALIASES: dict[str, str] = {"out": "o", "fc1": "up", "fc2": "down"}
_AUTO = "auto"


def default_specs(mode: str) -> tuple["QuantSpec | None", "QuantSpec | None"]:
    """(weight spec, activation spec) of a mode: what `QuantConfig` uses for w / a left at
    "auto" and what `mixq.nn.quantize_linear` uses when given none.

    w4a4: int4 symmetric groups of 128 + int4 per token; w4a16: int4 g128, float activations;
    w8a8: int8 per output channel + int8 per token; fp16 / bf16: (None, None).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return {
        "w4a4": (QuantSpec(4, True, "group", 128), QuantSpec(4, True, "row")),
        "w4a16": (QuantSpec(4, True, "group", 128), None),
        "w8a8": (QuantSpec(8, True, "row"), QuantSpec(8, True, "row")),
    }.get(mode, (None, None))


def check_mode(mode) -> str:
    """`mode` lower-cased, or ValueError naming `MODES`."""
    if not isinstance(mode, str) or mode.lower() not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode.lower()


def _spec_to_dict(spec: "QuantSpec | None") -> "dict | None":
    return None if spec is None else {"bits": spec.bits, "symmetric": spec.symmetric,
                                      "granularity": spec.granularity,
                                      "group_size": spec.group_size, "tile": list(spec.tile)}


def _spec_from_dict(d: "dict | None", what: str) -> "QuantSpec | None":
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a dict of QuantSpec fields or null, got {d!r}")
    try:
        return QuantSpec(**{**d, "tile": tuple(d.get("tile", (8, 8)))})
    except TypeError as e:
        raise ValueError(f"{what}: bad QuantSpec fields {sorted(d)}: {e}") from None


def _encode(v: _Any) -> _Any:
    """JSON-able form of a method parameter (QuantSpec, tuples, nested dataclasses)."""
    if isinstance(v, QuantSpec):
        return {"__quantspec__": _spec_to_dict(v)}
    if _dc.is_dataclass(v) and not isinstance(v, type):
        return {"__method__": _method_to_dict(v)}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _encode(x) for k, x in v.items()}
    return v


def _decode(v: _Any) -> _Any:
    """Inverse of `_encode` (lists come back as tuples: method configs are frozen/hashable)."""
    if isinstance(v, dict):
        if set(v) == {"__quantspec__"}:
            return _spec_from_dict(v["__quantspec__"], "method parameter")
        if set(v) == {"__method__"}:
            return _method_from_dict(v["__method__"])
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return tuple(_decode(x) for x in v)
    return v


def _method_to_dict(m: _Any) -> dict:
    if not (_dc.is_dataclass(m) and not isinstance(m, type)):
        raise TypeError(f"QuantConfig.methods entries must be method dataclass instances, "
                        f"got {type(m).__name__}")
    params = {f.name: _encode(getattr(m, f.name)) for f in _dc.fields(m) if f.init}
    return {"class": type(m).__name__, "module": type(m).__module__, "params": params}


def _method_from_dict(d: dict) -> _Any:
    if not isinstance(d, dict) or not {"class", "module", "params"} <= set(d):
        raise ValueError(f"a method entry must be {{'class', 'module', 'params'}}, got {d!r}")
    module = str(d["module"])
    if module != "mixq.methods" and not module.startswith("mixq.methods."):
        raise ValueError(f"method module must be inside mixq.methods, got {module!r}")
    try:
        cls = getattr(_importlib.import_module(module), d["class"])
    except (ImportError, AttributeError) as e:
        raise ValueError(f"unknown method {module}.{d['class']}: {e}") from None
    return cls(**{k: _decode(v) for k, v in d["params"].items()})


@dataclass(frozen=True)
class QuantConfig:
    """What `mixq.quantize` does to a causal LM: which linears, which grid, which methods.

    Args:
        w: weight quantizer. "auto" (default) = int4 symmetric groups of 128 (w4a4, w4a16) or
            int8 per row (w8a8); None for mode "fp16". W4A4 needs a symmetric <=4-bit spec;
            W4A16 any <=4-bit spec; W8A8 int8 symmetric "row". A K that the group size does
            not divide is zero-padded (`mixq.nn`).
        a: activation quantizer, per token (granularity "row", symmetric). "auto" = int4 (w4a4),
            int8 (w8a8), None (w4a16, fp16: weight-only / no quantization).
        mode: "w4a4" (int4 x int4 + FP16 outlier channels), "w4a16" (weight-only int4),
            "w8a8", "fp16" (linears cast to fp16; a baseline).
        outlier_frac: fraction in [0, 0.5] of each linear's input channels kept in FP16
            (w4a4 only): k = ceil(outlier_frac * K); the other K - k channels are int4.
        outlier_strategy: how outlier channels are ranked: "calib_max" (calibration max |x|
            per channel; needs calibration data) or a salient-weight strategy "max",
            "mean3std", "argmax" (`mixq.outliers.salient_weight_channels`, no data needed).
        methods: method configs from `mixq.methods` (frozen dataclasses with ``apply(ctx)``),
            applied in order on every decoder layer before the weights are quantized.
        targets: linear kinds to quantize, a subset of `TARGETS` (q, k, v, o, gate, up, down;
            OPT's out_proj / fc1 / fc2 are o / up / down, and the names "out", "fc1", "fc2"
            are accepted for them). Default: all.
        skip: fnmatch patterns of qualified module names left in float, e.g.
            ``("model.layers.0.*", "*.down_proj")``.
        layer_overrides: {fnmatch pattern of qualified name: weight QuantSpec}, first match wins
            (layer-wise mixed precision). In w4a4/w4a16 an override with bits <= 4 changes the
            weight grid; bits == 8 (symmetric, "row") turns that linear into W8A8.
        quantize_lm_head: also quantize lm_head (with `w`, weight-only int4 / the mode's module).
        attention: an `AttentionQuantConfig` (bits of Q, K, V and the softmax
            probabilities P) or None (default: the model's float attention). `mixq.quantize`
            and `mixq.load_quantized` switch the model to it (`enable_quantized_attention`).
        kv_cache: a `KVCacheSpec` or None: the cache `mixq.api.make_cache(model)` returns for
            ``generate(past_key_values=...)`` (a `mixq.hf.kv_cache.KV4Cache`; None -> no cache
            object, HF's float default). Independent of `attention`.
        fuse_norm: fuse each pre-norm with the int4 activation quantization of the W4A4 linears
            that read it (`mixq.hf.norm_fusion.fuse_norm_quant`, after the linears are swapped). Needs mode
            "w4a4" with 4-bit activations and "row"/"group" weights (the W4A4 kernel path); a
            norm whose consumers cannot share one payload is skipped (see
            ``model.mixq_fused_norms``). Changes speed on CUDA, never the outputs.
        fuse_projections: compute q/k/v as one GEMM and gate/up as one GEMM per decoder layer
            (`mixq.hf.projection_fusion.fuse_projections`, after the linears are swapped; any
            mode whose weights have per-row or per-group scales). A group that cannot be
            stacked (e.g. another outlier set per linear) is skipped (see
            ``model.mixq_fused_projections``). State dicts and checkpoints keep the unstacked
            layout. Changes speed; the outputs are equal up to fp32 rounding on the kernels.
    """

    w: "QuantSpec | None | str" = _AUTO
    a: "QuantSpec | None | str" = _AUTO
    mode: str = "w4a4"
    outlier_frac: float = 0.0
    outlier_strategy: str = "calib_max"
    methods: tuple = ()
    targets: tuple[str, ...] = TARGETS
    skip: tuple[str, ...] = ()
    layer_overrides: dict = _dc.field(default_factory=dict)
    quantize_lm_head: bool = False
    attention: AttentionQuantConfig | None = None
    kv_cache: "KVCacheSpec | None" = None
    fuse_norm: bool = False
    fuse_projections: bool = False

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if not isinstance(self.mode, str) or self.mode.lower() not in MODES:
            raise ValueError(f"QuantConfig.mode must be one of {MODES}, got {self.mode!r}")
        set_("mode", self.mode.lower())
        w_def, a_def = default_specs(self.mode)
        if isinstance(self.w, str) and self.w == _AUTO:
            set_("w", w_def)
        if isinstance(self.a, str) and self.a == _AUTO:
            set_("a", a_def)
        self._check_specs()
        frac = self.outlier_frac
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 0.5:
            raise ValueError(f"QuantConfig.outlier_frac must be a number in [0, 0.5], got {frac!r}")
        set_("outlier_frac", float(frac))
        if frac > 0 and self.mode != "w4a4":
            raise ValueError(f"QuantConfig.outlier_frac > 0 needs mode 'w4a4' (FP16 outlier "
                             f"channels), got mode {self.mode!r}")
        if self.outlier_strategy not in OUTLIER_STRATEGIES:
            raise ValueError(f"QuantConfig.outlier_strategy must be one of {OUTLIER_STRATEGIES}, "
                             f"got {self.outlier_strategy!r}")
        if isinstance(self.methods, (str, bytes)) or not isinstance(self.methods, (tuple, list)):
            raise TypeError(f"QuantConfig.methods must be a tuple of method configs, "
                            f"got {type(self.methods).__name__}")
        for i, m in enumerate(self.methods):
            if not callable(getattr(m, "apply", None)):
                raise TypeError(f"QuantConfig.methods[{i}] ({type(m).__name__}) has no apply(ctx)")
        set_("methods", tuple(self.methods))
        for name in ("targets", "skip"):
            v = getattr(self, name)
            if isinstance(v, str) or not isinstance(v, (tuple, list)) or \
                    not all(isinstance(t, str) for t in v):
                raise TypeError(f"QuantConfig.{name} must be a tuple of str, got {v!r}")
            set_(name, tuple(v))
        bad = [t for t in self.targets if t not in TARGETS and t not in TARGET_ALIASES]
        if bad or not self.targets:
            raise ValueError(f"QuantConfig.targets must be a non-empty subset of {TARGETS} "
                             f"(OPT names {sorted(TARGET_ALIASES)} also accepted), "
                             f"got {self.targets!r}")
        set_("targets", tuple(dict.fromkeys(TARGET_ALIASES.get(t, t) for t in self.targets)))
        if not isinstance(self.layer_overrides, dict):
            raise TypeError(f"QuantConfig.layer_overrides must be a dict {{pattern: QuantSpec}}, "
                            f"got {type(self.layer_overrides).__name__}")
        for pat, spec in self.layer_overrides.items():
            if not isinstance(pat, str) or not isinstance(spec, QuantSpec):
                raise TypeError(f"QuantConfig.layer_overrides must map str -> QuantSpec, "
                                f"got {pat!r}: {type(spec).__name__}")
            self._check_override(pat, spec)
        set_("layer_overrides", dict(self.layer_overrides))
        if not isinstance(self.quantize_lm_head, bool):
            raise TypeError(f"QuantConfig.quantize_lm_head must be a bool, "
                            f"got {self.quantize_lm_head!r}")
        self._check_full_architecture()

    # -- validation helpers
    def _check_specs(self) -> None:
        w, a, mode = self.w, self.a, self.mode
        for name, s in (("w", w), ("a", a)):
            if s is not None and not isinstance(s, QuantSpec):
                raise TypeError(f"QuantConfig.{name} must be a QuantSpec, None or 'auto', "
                                f"got {s!r}")
        if mode in FLOAT_MODES:
            if w is not None or a is not None:
                raise ValueError(f"QuantConfig mode {mode!r} quantizes nothing: leave w and a at "
                                 f"'auto' or None, got w={w!r}, a={a!r}")
            return
        if w is None:
            raise ValueError(f"QuantConfig.w must be a QuantSpec for mode {mode!r}, got None")
        if mode == "w4a16":
            if w.bits > 4:
                raise ValueError(f"QuantConfig.w must have bits <= 4 for w4a16, got {w.describe()}")
            if a is not None:
                raise ValueError(f"QuantConfig.a must be None for weight-only mode 'w4a16', "
                                 f"got {a.describe()}")
            return
        if a is None:
            raise ValueError(f"QuantConfig.a must be a per-token QuantSpec for mode {mode!r}")
        if a.granularity != "row" or not a.symmetric:
            raise ValueError(f"QuantConfig.a must be symmetric per token (granularity 'row'), "
                             f"got {a.describe()}")
        if mode == "w4a4":
            if w.bits > 4 or not w.symmetric:
                raise ValueError(f"QuantConfig.w must be symmetric with bits <= 4 for w4a4, "
                                 f"got {w.describe()}")
        else:  # w8a8
            if w != QuantSpec(8, True, "row", w.group_size, w.tile) or a.bits != 8:
                raise ValueError(f"w8a8 needs w = int8 symmetric 'row' and a.bits = 8, got "
                                 f"w={w.describe()}, a={a.describe()}")

    def _check_full_architecture(self) -> None:
        """attention / kv_cache / fuse_norm / fuse_projections: types, and what fusing norms needs."""
        if self.attention is not None and \
                not isinstance(self.attention, AttentionQuantConfig):
            raise TypeError(f"QuantConfig.attention must be a mixq.AttentionQuantConfig "
                            f"or None, got {type(self.attention).__name__}")
        if self.kv_cache is not None and not isinstance(self.kv_cache, KVCacheSpec):
            raise TypeError(f"QuantConfig.kv_cache must be a mixq.config.KVCacheSpec or None "
                            f"(e.g. KVCacheSpec(bits=4, group_size=32)), "
                            f"got {type(self.kv_cache).__name__}")
        if not isinstance(self.fuse_norm, bool):
            raise TypeError(f"QuantConfig.fuse_norm must be a bool, got {self.fuse_norm!r}")
        if not isinstance(self.fuse_projections, bool):
            raise TypeError(f"QuantConfig.fuse_projections must be a bool, got "
                            f"{self.fuse_projections!r}")
        if self.fuse_norm:
            if self.mode != "w4a4":
                raise ValueError(f"QuantConfig.fuse_norm needs mode 'w4a4' (the norm feeds int4 "
                                 f"activations to W4A4 linears), got mode {self.mode!r}")
            if self.a.bits != 4 or self.w.granularity not in ("row", "group"):
                raise ValueError(f"QuantConfig.fuse_norm needs the W4A4 kernel path: 4-bit "
                                 f"activations and 'row'/'group' weights, got "
                                 f"w={self.w.describe()}, a={self.a.describe()}")

    def _check_override(self, pat: str, spec: QuantSpec) -> None:
        if self.mode in (*FLOAT_MODES, "w8a8"):
            raise ValueError(f"QuantConfig.layer_overrides are for w4a4/w4a16, "
                             f"got mode {self.mode!r}")
        if spec.bits == 8:
            if not spec.symmetric or spec.granularity != "row":
                raise ValueError(f"layer_overrides[{pat!r}]: an 8-bit override means W8A8 and must "
                                 f"be symmetric 'row', got {spec.describe()}")
        elif spec.bits > 4:
            raise ValueError(f"layer_overrides[{pat!r}] must have bits <= 4 or == 8 (no module "
                             f"for {spec.bits} bits), got {spec.describe()}")
        elif self.mode == "w4a4" and not spec.symmetric:
            raise ValueError(f"layer_overrides[{pat!r}] must be symmetric in w4a4, "
                             f"got {spec.describe()}")

    # -- serialisation
    def to_dict(self) -> dict:
        """JSON-able dict (QuantSpecs as field dicts, methods as {class, module, params})."""
        return {"w": _spec_to_dict(self.w), "a": _spec_to_dict(self.a), "mode": self.mode,
                "outlier_frac": self.outlier_frac, "outlier_strategy": self.outlier_strategy,
                "methods": [_method_to_dict(m) for m in self.methods],
                "targets": list(self.targets), "skip": list(self.skip),
                "layer_overrides": {k: _spec_to_dict(v) for k, v in self.layer_overrides.items()},
                "quantize_lm_head": self.quantize_lm_head,
                "attention": _attention_to_dict(self.attention),
                "kv_cache": None if self.kv_cache is None else self.kv_cache.to_dict(),
                "fuse_norm": self.fuse_norm, "fuse_projections": self.fuse_projections}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """Inverse of `to_dict`; unknown keys or bad values raise ValueError. Keys missing
        from `d` (e.g. ``attention``, ``kv_cache``, ``fuse_norm``, ``fuse_projections`` in files written before they
        existed) take their defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"QuantConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in _dc.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"QuantConfig.from_dict: unknown keys {unknown} "
                             f"(known: {sorted(known)})")
        kw = dict(d)
        for k in ("w", "a"):
            if k in kw and kw[k] != _AUTO:
                kw[k] = _spec_from_dict(kw[k], f"QuantConfig.{k}")
        if "methods" in kw:
            kw["methods"] = tuple(_method_from_dict(m) for m in kw["methods"])
        for k in ("targets", "skip"):
            if k in kw:
                kw[k] = tuple(kw[k])
        if "layer_overrides" in kw:
            kw["layer_overrides"] = {p: _spec_from_dict(s, f"layer_overrides[{p!r}]")
                                     for p, s in kw["layer_overrides"].items()}
        if "attention" in kw:
            kw["attention"] = _attention_from_dict(kw["attention"])
        if kw.get("kv_cache") is not None:
            kw["kv_cache"] = KVCacheSpec.from_dict(kw["kv_cache"])
        return cls(**kw)
