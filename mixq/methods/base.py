"""The method protocol: one decoder layer's context, and the helpers every PTQ method shares.

A *method* is a frozen dataclass config with ``apply(self, ctx: LayerContext) -> None``. It runs
once per decoder layer, after calibration of that layer and before its linears are swapped for
quantized modules. Two kinds exist:

* **transforms** (SmoothQuant, AWQ, rotation) edit float weights / norms IN PLACE so that the
  layer computes the same float function while its linears become easier to quantize;
* **weight quantizers** (clip search, GPTQ, AdaRound) choose the integer weights themselves and
  store them in ``ctx.qweights[name]``; a linear without an entry gets RTN with its spec.

Methods also leave per-linear decisions in the context for whoever builds the modules:
``ctx.outlier_idx`` (FP16 input channels), ``ctx.w_specs`` / ``ctx.a_bits`` (mixed precision),
``ctx.input_transforms`` (an online orthogonal rotation of the input, see rotation.py).

Quantized weight convention (``ctx.qweights[name]``)
----------------------------------------------------
A `mixq.quant.QTensor` of the *int4 part* of ``W (N, K)``, exactly what `mixq.nn.W4A4Linear`
stores: the ``Kq = K - k`` regular columns (outliers removed, remaining channels in ascending
order, i.e. ``W[:, outlier_permutation(K, idx)][:, :Kq]``), zero-padded along K to
``Kp = ceil(Kq / bc) * bc`` (bc = group size / tile width, 1 otherwise) and, for tile specs, along
N to a multiple of the tile height. The FP16 outlier columns are read from ``linear.weight``
(GPTQ updates them in place). `quantized_output` is the one function that evaluates a linear
under this convention, with `mixq.reference.w4a4_linear` whenever the int path applies.

Scale folding (`fold_scale`)
----------------------------
For a group of linears that share the input ``x (M, K)`` and a per-channel ``s (K,) > 0``::

    x W^T = (x diag(s)^-1) (W diag(s))^T

``x / s`` is produced for free by the previous op: an RMSNorm/LayerNorm weight (and bias) is
divided by ``s``; a previous linear's output rows (and bias) are divided by ``s`` (Llama v->o:
attention mixes tokens, not channels; OPT/ReLU: ``relu(z / s) = relu(z) / s`` for ``s > 0``).
With grouped-query attention the o_proj input channel ``h * hd + d`` comes from v_proj row
``(h // n_rep) * hd + d``, so ``s`` must be equal over the ``n_rep`` heads sharing a kv head:
`tie_scale` projects a free ``s`` onto that set (geometric mean over the tied channels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from mixq import reference
from mixq.config import QuantSpec
from mixq.outliers import outlier_permutation
from mixq.quant import QTensor, expand_blocks, quantize, rel_fro_error
from mixq.validation import FLOAT_DTYPES, check_tensor

from mixq.calibrate import LinearStats
from mixq.hf.models import LinearGroup, linear_kind

__all__ = ["LayerContext", "Method", "LinearGroup", "LinearStats", "check_choice", "check_number",
           "check_int", "linear_kind", "group_inputs", "hessian_of", "tie_scale",
           "fold_scale", "fold_norm_into_linears", "weight_block_cols", "quantize_weight",
           "quantize_with_scale", "weight_grid", "dequantize_qweight", "quantized_output",
           "float_output", "output_error", "group_output_error", "regular_weight",
           "head_layout"]


# ----------------------------------------------------------------------------- config checks
def check_number(value, name: str, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """ValueError unless `value` is a real number in the (half-)open/closed range; return it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return value


def check_int(value, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """ValueError unless `value` is an int (not bool) in [lo, hi]; return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return value


def check_choice(value, name: str, choices) -> Any:
    """ValueError unless `value` is one of `choices`."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- the context
@dataclass
class LayerContext:
    """Everything a method sees of one decoder layer.

    Attributes:
        layer: the decoder layer (nn.Module), edited in place by transforms.
        groups: list of `LinearGroup` (mixq.hf.models): linears sharing one input + what produces it.
        stats: qualified name within the layer (e.g. "self_attn.q_proj") -> `LinearStats`
            (mixq.calibrate) of that linear's input. Transforms keep them in the *weight's basis*
            (the input that multiplies ``linear.weight``): `fold_scale` rescales them, rotation
            rotates them (also for online rotations).
        config: the `QuantConfig` (needs ``.w: QuantSpec`` and ``.a: QuantSpec | None``).
        index: the layer's index in the model (LayerwiseQuant selects on it), or None.
        qweights: name -> QTensor chosen by a weight quantizer (convention: module docstring).
        outlier_idx: name -> int64 (k,) input channels kept in FP16 (sorted); missing = none.
            The caller fills it from ``config.outlier_frac`` before running methods.
        w_specs: name -> QuantSpec overriding ``config.w`` for that linear.
        a_bits: name -> activation bits (per token) overriding ``config.a.bits``; None = weight-only.
        input_transforms: name -> (K, K) fp32 orthogonal Q: the module must compute
            ``quant(x @ Q) @ quant(W)^T`` where ``W`` (already rotated, ``W_orig @ Q``) is
            ``linear.weight`` (an *online* rotation, see rotation.py).
    """

    layer: nn.Module
    groups: list
    stats: dict
    config: Any
    index: int | None = None
    qweights: dict = field(default_factory=dict)
    outlier_idx: dict = field(default_factory=dict)
    w_specs: dict = field(default_factory=dict)
    a_bits: dict = field(default_factory=dict)
    input_transforms: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.layer, nn.Module):
            raise TypeError(f"layer must be an nn.Module, got {type(self.layer).__name__}")
        for g in self.groups:
            if len(g.names) != len(g.linears) or not g.names:
                raise ValueError(f"group {g.kind!r}: names {g.names} and linears must match, non-empty")
            for n in g.names:
                if n not in self.stats:
                    raise ValueError(f"stats has no entry for linear {n!r} (keys: {sorted(self.stats)})")
        if not isinstance(getattr(self.config, "w", None), QuantSpec):
            raise TypeError("config must have a QuantSpec attribute .w (a QuantConfig)")

    # lookups -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Qualified names of every linear in the groups, in group order."""
        return [n for g in self.groups for n in g.names]

    def linear(self, name: str) -> nn.Linear:
        """The nn.Linear called `name`."""
        for g in self.groups:
            for n, lin in zip(g.names, g.linears):
                if n == name:
                    return lin
        raise KeyError(f"no linear named {name!r}; have {self.names()}")

    def weight_spec(self, name: str) -> QuantSpec:
        """Weight quantizer of `name`: ``w_specs[name]`` else ``config.w``."""
        return self.w_specs.get(name, self.config.w)

    def act_bits(self, name: str) -> int | None:
        """Per-token activation bits of `name` (None = float activations, weight-only)."""
        if name in self.a_bits:
            return self.a_bits[name]
        a = getattr(self.config, "a", None)
        return None if a is None else a.bits

    def outliers(self, name: str) -> torch.Tensor:
        """Sorted int64 FP16 input channels of `name` (possibly empty)."""
        idx = self.outlier_idx.get(name)
        if idx is None:
            return torch.empty(0, dtype=torch.int64)
        return torch.sort(idx.to(torch.int64).cpu()).values

    def set_qweight(self, name: str, qt: QTensor) -> None:
        """Store a weight quantizer's result; a second quantizer on one linear is an error."""
        if name in self.qweights:
            raise ValueError(f"linear {name!r} already has quantized weights from an earlier method; "
                             "apply only one weight quantizer (RTN/clip/GPTQ/AdaRound) per linear")
        self.qweights[name] = qt


@runtime_checkable
class Method(Protocol):
    """A PTQ method: a frozen dataclass config validated in ``__post_init__``."""

    def apply(self, ctx: LayerContext) -> None:
        """Edit ``ctx.layer`` weights in place and/or fill ``ctx`` entries (see LayerContext)."""


# ----------------------------------------------------------------------------- calibration data
def group_inputs(ctx: LayerContext, group) -> torch.Tensor:
    """Calibration inputs (n, K) fp32 of a group (shared by all its linears)."""
    st = ctx.stats[group.names[0]]
    if st.inputs is None:
        raise ValueError(f"stats[{group.names[0]!r}].inputs is None; this method needs the "
                         "calibration input rows (calibrate with max_rows > 0)")
    return st.inputs.float()


def hessian_of(stats, sink_weight: float | str = 1.0) -> torch.Tensor:
    """``H = 2/n X^T X`` (K, K) fp32: ``stats.hessian`` if collected, else from ``stats.inputs``.

    `sink_weight` w counts each sequence's first token (the attention sink: every later token
    attends to its keys and values, yet it is one row of T) w times:
    ``H + (w - 1) * stats.sink_hessian``. ``"seqlen"`` = T, the mean calibration sequence length
    (``n_tokens / n_sequences``). w = 1 (default) or stats without a sink Hessian: plain H.
    """
    w = sink_weight
    if w == "seqlen":
        n_seq = getattr(stats, "n_sequences", 0)
        w = stats.n_tokens / n_seq if n_seq else 1.0
    sink = getattr(stats, "sink_hessian", None)
    if getattr(stats, "hessian", None) is not None:
        if w != 1.0 and sink is not None:
            return (stats.hessian.double() + (float(w) - 1.0) * sink.double()).float()
        return stats.hessian.float()
    if stats.inputs is None:
        raise ValueError("stats has neither a hessian nor inputs")
    x = stats.inputs.double()
    return (2.0 / x.shape[0] * x.T @ x).float()


def head_layout(ctx: LayerContext, group) -> tuple[int, int] | None:
    """(head_dim, n_rep) for an "attn_out" group (v projection feeding o through attention; read
    from ``layer.self_attn.head_dim`` or its config), else None."""
    if group.prev_linear is None or group.kind != "attn_out":
        return None
    attn = getattr(ctx.layer, "self_attn", None)
    k = group.linears[0].in_features
    kv = group.prev_linear.out_features
    hd = getattr(attn, "head_dim", None)
    if hd is None and attn is not None and hasattr(attn, "config"):
        cfg = attn.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if kv == k:
        return (hd, 1) if hd else None
    if hd is None or k % kv or kv % hd:
        raise ValueError(f"group {group.kind!r}: prev_linear gives {kv} channels but the linears read "
                         f"{k}; cannot map them without layer.self_attn.head_dim")
    return int(hd), k // kv


def _tie_index(k: int, hd: int, n_rep: int) -> torch.Tensor:
    """o-input channel c = h*hd + d -> v row (h // n_rep)*hd + d."""
    c = torch.arange(k)
    return (c // hd // n_rep) * hd + c % hd


def _channel_map(ctx: LayerContext, group) -> torch.Tensor | None:
    """int64 (K,) prev_linear row of each input channel, or None when it is the identity.
    ``group.prev_channel_map`` (mixq.hf.models) wins; else derived from `head_layout` (GQA)."""
    cm = getattr(group, "prev_channel_map", None)
    if cm is not None:
        return cm.to(torch.int64).cpu()
    lay = head_layout(ctx, group)
    if lay is None or lay[1] == 1:
        return None
    return _tie_index(group.linears[0].in_features, *lay)


def tie_scale(ctx: LayerContext, group, s: torch.Tensor) -> torch.Tensor:
    """Project a per-channel scale (K,) onto scales foldable into the group's producer.

    Only GQA (prev_linear with fewer outputs than K) constrains ``s``: channels reading the same
    v row get the geometric mean of their scales. Otherwise ``s`` is returned unchanged.
    """
    idx = _channel_map(ctx, group) if group.prev_linear is not None else None
    if idx is None:
        return s
    kv = group.prev_linear.out_features
    idx = idx.to(s.device)
    cnt = torch.bincount(idx, minlength=kv).clamp(min=1).double()
    logm = torch.zeros(kv, dtype=torch.float64, device=s.device).index_add_(0, idx, s.double().log()) / cnt
    return logm.exp()[idx].to(s.dtype)


# ----------------------------------------------------------------------------- folding
def _check_group_free(ctx: LayerContext, group) -> None:
    for n in group.names:
        if n in ctx.qweights:
            raise ValueError(f"{n!r} already has quantized weights: transforms must run before "
                             "weight quantizers (order config.methods accordingly)")


def fold_scale(ctx: LayerContext, group, s: torch.Tensor) -> None:
    """Fold ``x -> x / s``, ``W -> W diag(s)`` into the group in place (function unchanged).

    Math: see module docstring. Also rescales the calibration stats of the group's linears
    (inputs, absmax, mean_abs, std by ``1/s``; hessian by ``1/(s s^T)``) so later methods see the
    transformed inputs.

    Args:
        ctx: the layer context.
        group: a LinearGroup with prev_norm (weight (K,), optional bias) or prev_linear
            (out_features K, or K / n_rep under GQA with a tied ``s``).
        s: (K,) positive finite float scale.
    Raises:
        ValueError: no foldable producer, bad ``s``, GQA-untied ``s``, weights already quantized.
    """
    k = group.linears[0].in_features
    check_tensor(s, "s", ndim=1, dtypes=FLOAT_DTYPES, finite=True)
    if s.shape[0] != k or bool((s <= 0).any()):
        raise ValueError(f"s must be (K,) = ({k},) and > 0, got shape {tuple(s.shape)}, "
                         f"min {float(s.min()):.3g}")
    _check_group_free(ctx, group)
    s = s.detach().double()
    with torch.no_grad():
        if group.prev_norm is not None:
            norm = group.prev_norm
            if getattr(norm, "weight", None) is None or norm.weight.shape != (k,):
                raise ValueError(f"group {group.kind!r}: prev_norm has no weight of shape ({k},)")
            norm.weight.copy_((norm.weight.double() / s).to(norm.weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_((norm.bias.double() / s).to(norm.bias.dtype))
        elif group.prev_linear is not None:
            prev = group.prev_linear
            idx = _channel_map(ctx, group)
            if idx is not None:
                idx = idx.to(s.device)
                sv = torch.ones(prev.out_features, dtype=torch.float64, device=s.device)
                sv[idx] = s
                if not torch.allclose(sv[idx], s, rtol=1e-6):
                    raise ValueError("s is not tied over GQA heads; call tie_scale first")
            else:
                sv = s
            prev.weight.copy_((prev.weight.double() / sv[:, None]).to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.copy_((prev.bias.double() / sv).to(prev.bias.dtype))
        else:
            raise ValueError(f"group {group.kind!r} ({group.names}) has neither prev_norm nor "
                             "prev_linear: a scale cannot be folded (e.g. OPT fc2 after ReLU)")
        for lin in group.linears:
            lin.weight.copy_((lin.weight.double() * s[None, :]).to(lin.weight.dtype))
    _scale_stats(ctx, group, s)


def _unique_stats(ctx: LayerContext, group):
    """The stats objects of `group`'s linears, each once (linears of a group may share one)."""
    seen = set()
    for n in group.names:
        st = ctx.stats[n]
        if id(st) in seen:
            continue
        seen.add(id(st))
        yield st


def _scale_stats(ctx: LayerContext, group, s: torch.Tensor) -> None:  # noqa: D401
    """Stats of inputs x / s (in place on the stats objects, shared or not)."""
    for st in _unique_stats(ctx, group):
        sf = s.float().to(st.absmax.device)
        st.absmax = st.absmax / sf
        st.mean_abs = st.mean_abs / sf
        st.std = st.std / sf
        if st.inputs is not None:
            st.inputs = st.inputs / sf.to(st.inputs.device)
        for name in ("hessian", "sink_hessian"):
            h = getattr(st, name, None)
            if h is not None:
                setattr(st, name, h / (sf[:, None] * sf[None, :]).to(h.device))


def fold_norm_into_linears(group) -> None:
    """Move a norm's affine part into the following linears, in place (function unchanged).

    ``norm(h) = n(h) * g + b``  ->  ``W n(h) * g + W b``: ``W <- W diag(g)``, ``bias <- bias + W b``
    (a bias is created if the linear had none and ``b != 0``); then ``g <- 1``, ``b <- 0``.
    The norm must feed only these linears (true for Llama/OPT pre-norms).
    """
    norm = group.prev_norm
    if norm is None or getattr(norm, "weight", None) is None:
        raise ValueError(f"group {group.kind!r} has no prev_norm with a weight to fold")
    with torch.no_grad():
        g = norm.weight.double()
        b = getattr(norm, "bias", None)
        for lin in group.linears:
            w = lin.weight.double()
            if b is not None and bool((b != 0).any()):
                extra = (w @ b.double()).to(lin.weight.dtype)
                if lin.bias is None:
                    lin.bias = nn.Parameter(extra.clone())
                else:
                    lin.bias.add_(extra.to(lin.bias.dtype))
            lin.weight.copy_((w * g[None, :]).to(lin.weight.dtype))
        norm.weight.fill_(1.0)
        if b is not None:
            b.zero_()


# ----------------------------------------------------------------------------- weights
def weight_block_cols(spec: QuantSpec, k: int) -> int:
    """Columns sharing one scale along K (group size / tile width; K for row and tensor)."""
    return spec.block_cols if spec.granularity in ("group", "tile") else k


def _padded_shape(n: int, k: int, spec: QuantSpec) -> tuple[int, int]:
    bc = spec.block_cols
    br = spec.tile[0] if spec.granularity == "tile" else 1
    return math.ceil(n / br) * br, math.ceil(k / bc) * bc


def _pad(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    n, k = w.shape
    np_, kp = _padded_shape(n, k, spec)
    out = torch.zeros(np_, kp, dtype=torch.float32, device=w.device)
    out[:n, :k] = w.float()
    return out


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    """RTN of a weight (N, K) with `spec` on the zero-padded (Np, Kp) matrix (the qweights
    convention: same codes and fp16 scales as `mixq.nn`).

    Args:
        w: (N, K) float, finite.
        spec: the weight quantizer.
    Returns:
        QTensor of shape (Np, Kp).
    """
    check_tensor(w, "w", ndim=2, dtypes=FLOAT_DTYPES, finite=True)
    return quantize(_pad(w, spec), spec)


def weight_grid(w: torch.Tensor, spec: QuantSpec, ratio: torch.Tensor | float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero) of the RTN grid of `w` (N, K), optionally shrunk by `ratio`.

    ``scale = fp16(ratio * range / qmax)`` per block (the absmax, or hi - lo when asymmetric,
    of the zero-padded weight); `ratio` is a float or a compact tensor of the scale's shape.
    Returns compact ``(scale fp16, zero uint8 or None)`` for the padded (Np, Kp) matrix.
    """
    qt = quantize(_pad(w, spec), spec, scale_dtype=torch.float32)
    rng = qt.scale.float() * spec.qmax
    scale = (rng * ratio / spec.qmax).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = None
    if not spec.symmetric:
        lo = -qt.zero.float() * qt.scale.float() * ratio   # approx. lower edge (range * ratio)
        zero = torch.round(-lo / scale.float()).clamp(0, spec.qmax).to(torch.uint8)
    return scale, zero


def quantize_with_scale(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor,
                        zero: torch.Tensor | None = None) -> QTensor:
    """Codes of `w` (N, K) on a given grid: ``q = clamp(round(w / s) + z, qmin, qmax)``.

    Args:
        w: (N, K) float weight (padded to (Np, Kp) internally).
        spec: the quantizer (gives the block structure and grid).
        scale: compact (fp16) scale of the padded matrix; zero: compact zero point or None.
    Returns:
        QTensor (Np, Kp) with the given scale/zero.
    """
    wp = _pad(w, spec)
    s = expand_blocks(scale, wp.shape, spec).float()
    z = 0.0 if zero is None else expand_blocks(zero, wp.shape, spec).float()
    q = (torch.round(wp / s) + z).clamp(spec.qmin, spec.qmax)
    dtype = torch.uint8 if (not spec.symmetric and spec.qmax > 127) else torch.int8
    return QTensor(q=q.to(dtype), scale=scale, zero=zero, spec=spec)


def dequantize_qweight(qt: QTensor, n: int, k: int) -> torch.Tensor:
    """Float32 (n, k) weight of a padded QTensor (the padding cut off)."""
    q = qt.q.float()
    if qt.zero is not None:
        q = q - expand_blocks(qt.zero, q.shape, qt.spec).float()
    return (q * expand_blocks(qt.scale, q.shape, qt.spec).float())[:n, :k]


def regular_weight(linear: nn.Linear, outlier_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_reg (N, Kq), W_out (N, k), perm (K,))`` fp32 views of the permuted weight."""
    w = linear.weight.detach().float()
    kq = w.shape[1] - outlier_idx.numel()
    perm = outlier_permutation(w.shape[1], outlier_idx.to(w.device))
    wp = w[:, perm]
    return wp[:, :kq], wp[:, kq:], perm


# ----------------------------------------------------------------------------- evaluation
def float_output(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``x @ W^T + b`` in fp32 (x (M, K) already in the linear's input basis)."""
    y = x.float() @ linear.weight.detach().float().T
    return y if linear.bias is None else y + linear.bias.detach().float()


def quantized_output(linear: nn.Linear, x: torch.Tensor, *, w_spec: QuantSpec,
                     act_bits: int | None, qweight: QTensor | None = None,
                     outlier_idx: torch.Tensor | None = None,
                     input_transform: torch.Tensor | None = None) -> torch.Tensor:
    """What the quantized module computes for input x: the W4A4 (or WxAy) output, fp32 (M, N).

    Math::

        x <- x @ Q                      (input_transform Q, if any; W is already W_orig Q)
        [x_reg | x_out] = x[:, perm]    (perm = outlier_permutation(K, outlier_idx))
        y = Q_a(x_reg) @ Q_w(W_reg)^T + fp16(x_out) @ fp16(W_out)^T + fp16(b)

    with Q_w = `qweight` (or RTN with `w_spec`) and Q_a per-token symmetric `act_bits`
    (None = float activations). For 4-bit symmetric row/group weights and 4-bit activations
    this is exactly `mixq.reference.w4a4_linear` (int32 accumulation); otherwise fake-quant.

    Args:
        linear: nn.Linear (N, K) in its current (possibly transformed) state.
        x: (M, K) float input of the linear.
        w_spec: the weight QuantSpec. act_bits: 2..8 or None.
        qweight: a QTensor under the LayerContext convention, or None for RTN.
        outlier_idx: int64 (k,) FP16 channels, or None.
        input_transform: (K, K) online rotation, or None.
    """
    check_tensor(x, "x", ndim=2, dtypes=FLOAT_DTYPES, finite=True)
    x = x.float()
    if input_transform is not None:
        x = x @ input_transform.float().to(x.device)
    idx = torch.empty(0, dtype=torch.int64) if outlier_idx is None else outlier_idx
    w_reg, w_out, perm = regular_weight(linear, idx)
    kq = w_reg.shape[1]
    x = x[:, perm.to(x.device)]
    x_reg, x_out = x[:, :kq], x[:, kq:]
    qt = quantize_weight(w_reg, w_spec) if qweight is None else qweight
    n = w_reg.shape[0]
    kp = qt.q.shape[1]
    x_reg = torch.nn.functional.pad(x_reg, (0, kp - kq))
    fast = (act_bits == 4 and w_spec.symmetric and w_spec.bits <= 4
            and w_spec.granularity in ("row", "group") and qt.q.shape[0] == n)
    if fast:
        g = w_spec.group_size if w_spec.granularity == "group" else None
        y = reference.w4a4_linear(x_reg, qt.q, qt.scale, group_size=g)
    else:
        w_deq = dequantize_qweight(qt, n, kp)
        if act_bits is not None:
            x_q, x_scale = reference.quantize_per_token(x_reg, act_bits)
            x_reg = x_q.float() * x_scale.float()
        y = x_reg @ w_deq.T
    if x_out.shape[1]:
        y = y + x_out.half().float() @ w_out.half().float().T
    # the quantized modules store the bias in fp16 (mixq.nn), so round it the same way
    return y if linear.bias is None else y + linear.bias.detach().half().float()


def output_error(ctx: LayerContext, name: str, x: torch.Tensor | None = None, *,
                 qweight: QTensor | None = None, w_spec: QuantSpec | None = None,
                 act_bits: int | str | None = "ctx") -> float:
    """Relative output error ``||y_q - y||_F / ||y||_F`` of linear `name`.

    Args:
        x: (M, K) inputs as the module receives them (an online ``input_transforms[name]`` is
            applied to them); default: the calibration inputs, which are kept in the weight's
            basis (already transformed), so no transform is applied to those.
        qweight: default ``ctx.qweights.get(name)`` (RTN when absent).
        w_spec: default ``ctx.weight_spec(name)``; act_bits: default ``ctx.act_bits(name)``.
    """
    lin = ctx.linear(name)
    q_in = ctx.input_transforms.get(name)
    if x is None:
        x, q_in = ctx.stats[name].inputs, None
        if x is None:
            raise ValueError(f"stats[{name!r}].inputs is None")
    ref = float_output(lin, x.float() @ q_in.float() if q_in is not None else x)
    y = quantized_output(lin, x, w_spec=w_spec or ctx.weight_spec(name),
                         act_bits=ctx.act_bits(name) if act_bits == "ctx" else act_bits,
                         qweight=qweight if qweight is not None else ctx.qweights.get(name),
                         outlier_idx=ctx.outliers(name), input_transform=q_in)
    return rel_fro_error(ref, y)


def group_output_error(ctx: LayerContext, group, x: torch.Tensor | None = None, **kw) -> float:
    """Sum of squared relative output errors of the group's linears (see `output_error`)."""
    return sum(output_error(ctx, n, x, **kw) ** 2 for n in group.names)
