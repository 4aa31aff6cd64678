"""`quantize(model, config, calib_data)`: turn a Hugging Face causal LM into a W4A4 (etc.) model.

Per decoder layer (sequentially, see `mixq.calibrate.calibrate_layerwise`)::

    stats  = calibration statistics of every linear's input          (LinearStats)
    for method in config.methods:  method.apply(ctx)                 (smooth / rotate / GPTQ ...)
    for each target linear:
        outlier_idx = top ceil(outlier_frac * K) channels             (calibration max |x|,
                                                                       or salient weights)
        W4A4Linear.from_linear(linear, weight_spec, act_bits, outlier_idx)   (RTN, or the
                                                                       method's QTensor)
        swap it into the layer

The quantized modules are drop-in (`mixq.nn`): the embeddings, norms, attention and lm_head are
left alone (lm_head only with ``quantize_lm_head``), so ``model.generate()`` keeps working.

Full architecture (`apply_full_architecture`, after every linear is swapped; calibration runs
with the float attention): ``config.attention`` switches the model to quantized attention
(`mixq.hf.attention.enable_quantized_attention`), ``config.fuse_norm`` fuses the pre-norms with
the activation quantization of their W4A4 consumers (`mixq.hf.norm_fusion.fuse_norm_quant`),
``config.fuse_projections`` computes q/k/v and gate/up each as one GEMM
(`mixq.hf.projection_fusion.fuse_projections`), and ``config.kv_cache`` is what `make_cache`
builds for ``generate(past_key_values=...)``.
`mixq.io.load_quantized` calls `apply_full_architecture` again (hooks are not saved).

Weight quantizers (GPTQ, AdaRound, clip search) hand their result over through
``ctx.qweights[name]``: a `mixq.quant.QTensor` of the layout `regular_weight` returns (the
regular, non-outlier columns in permuted order, zero-padded to the block width), with the spec
`weight_spec_for` gives. A linear without an entry gets RTN.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from fnmatch import fnmatch

import torch
from torch import nn
from tqdm.auto import tqdm

from mixq import outliers as _outliers
from mixq import quant
from mixq.calibrate import LinearStats, calibrate_layerwise
from mixq.config import FLOAT_MODES, TARGETS, KVCacheSpec, QuantConfig, QuantSpec
from mixq.hf.models import LinearGroup, get_adapter, linear_kind
from mixq.hf.attention import disable_quantized_attention, enable_quantized_attention
from mixq.hf.kv_cache import KV4Cache, guard_generate
from mixq.hf.norm_fusion import fuse_norm_quant
from mixq.hf.projection_fusion import fuse_projections
from mixq.nn import QuantLinearBase, RotatedInputLinear, quantize_linear

__all__ = ["quantize", "choose_outliers", "weight_spec_for", "regular_weight", "is_quantized",
           "CONFIG_ATTR", "FUSED_NORMS_ATTR", "apply_full_architecture", "make_cache"]

#: Attribute set on a quantized model: its `QuantConfig` (read by `mixq.io.save_quantized`).
CONFIG_ATTR = "mixq_config"
#: Attribute set when ``config.fuse_norm``: {norm name: "fused -> ..." | "skipped: why"}.
FUSED_NORMS_ATTR = "mixq_fused_norms"
#: Attribute set when ``config.fuse_projections``: {stack name: "stacked <- ..." | "skipped: why"}.
FUSED_PROJECTIONS_ATTR = "mixq_fused_projections"


# ------------------------------------------------------------------------------- per-linear pieces
def weight_spec_for(qualified_name: str, config: QuantConfig) -> QuantSpec | None:
    """The weight QuantSpec of a linear: the first matching ``layer_overrides`` pattern, else
    ``config.w`` (None in mode fp16)."""
    for pattern, spec in config.layer_overrides.items():
        if fnmatch(qualified_name, pattern):
            return spec
    return config.w


def _n_outliers(k_in: int, config: QuantConfig) -> int:
    """How many FP16 outlier channels `choose_outliers` picks for a linear of K = `k_in`:
    min(ceil(outlier_frac * K), K - 1) in mode w4a4, else 0."""
    if config.outlier_frac == 0.0 or config.mode != "w4a4":
        return 0
    return min(math.ceil(config.outlier_frac * k_in - 1e-9), k_in - 1)


def choose_outliers(linear: nn.Linear, config: QuantConfig,
                    stats: LinearStats | None) -> torch.Tensor:
    """FP16 outlier input channels of one linear, int64 (k,) ascending, k = ceil(frac * K).

    "calib_max": the k channels with the largest calibration max |x| (`stats.absmax`);
    "max" / "mean3std" / "argmax": salient weight channels (`outliers.salient_weight_channels`).
    k is capped at K - 1 (at least one channel stays int4). Empty when ``outlier_frac == 0``.
    """
    k_in = linear.in_features
    k = _n_outliers(k_in, config)
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if config.outlier_strategy == "calib_max":
        if stats is None:
            raise ValueError("outlier_strategy='calib_max' needs calibration statistics: "
                             "pass calib_data to quantize()")
        return _outliers.outliers_topk(stats.absmax.float().cpu(), k=k)
    w = linear.weight.detach().float().cpu()
    idx = _outliers.salient_weight_channels(w, config.outlier_frac, config.outlier_strategy)
    return idx[:k] if idx.numel() > k else idx


def regular_weight(linear: nn.Linear, outlier_idx: torch.Tensor,
                   spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight part a weight quantizer must quantize, in the layout the W4A4 module stores.

    Args:
        linear: nn.Linear, weight (N, K).
        outlier_idx: int64 (k,) FP16 channels (may be empty).
        spec: the weight QuantSpec (its group/tile width sets the padding).
    Returns:
        ``(w_reg, perm)``: w_reg float32 (N, Kp), the columns ``W[:, perm[:K-k]]`` zero-padded to
        Kp = ceil((K-k) / block) * block; perm int64 (K,) = `outliers.outlier_permutation`.
        A `QTensor` of w_reg with `spec` is what ``ctx.qweights[name]`` expects.
    """
    w = linear.weight.detach().float()
    k_in = w.shape[1]
    perm = _outliers.outlier_permutation(k_in, outlier_idx.to(torch.int64).cpu()).to(w.device)
    kq = k_in - outlier_idx.numel()
    kp = math.ceil(kq / spec.block_cols) * spec.block_cols
    w_reg = torch.zeros(w.shape[0], kp, dtype=torch.float32, device=w.device)
    w_reg[:, :kq] = w[:, perm[:kq]]
    return w_reg, perm


def is_quantized(module: nn.Module) -> bool:
    """True for mixq's quantized linear modules."""
    return isinstance(module, QuantLinearBase)


# ------------------------------------------------------------------------------- per layer
def _make_context(**fields):
    """A `mixq.methods.base.LayerContext` from the fields it declares (extra ones dropped)."""
    try:
        from mixq.methods.base import LayerContext
    except ImportError as e:  # methods given but the package is not there
        raise ImportError(f"config.methods needs mixq.methods.base.LayerContext: {e}") from None
    names = {f.name for f in dataclasses.fields(LayerContext)}
    return LayerContext(**{k: v for k, v in fields.items() if k in names})


def _stacked(linears: list[nn.Linear]) -> nn.Linear:
    """A bias-free CPU linear whose weight stacks the rows of `linears` (one input, K shared):
    salient-weight outliers of a group (q/k/v, gate/up) rank the channel over all its readers,
    so the group shares one outlier set (one activation quantization, `fuse_norm_quant`)."""
    w = torch.cat([lin.weight.detach().float().cpu() for lin in linears])
    out = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    out.weight = nn.Parameter(w, requires_grad=False)
    return out


class _LayerQuantizer:
    """The ``on_layer`` callback of `quantize`: methods, outliers, module swap for one layer.

    Quantizes exactly the linears of `_plan` (``planned``: qualified names). Outlier channels
    follow the *current* statistics: they are chosen from ``stats`` before the
    first method and re-chosen after each method (transforms keep ``stats`` in the weight's
    basis), except for linears a method has committed: an explicit ``ctx.outlier_idx`` entry
    (OutlierChannels) or method-quantized weights (``ctx.qweights``, GPTQ/clip: their int4 columns
    depend on the outliers they saw). Every module of the layer is built before the first is
    swapped in; `undo` records the layer first (see `_Undo`).
    """

    def __init__(self, config: QuantConfig, prefix_of, planned: set[str], undo: "_Undo") -> None:
        self.config, self.prefix_of, self.planned, self.undo = config, prefix_of, planned, undo
        self.report: dict[str, dict] = {}

    def targets(self, i: int, groups: list[LinearGroup]) -> dict[str, tuple[str, nn.Linear]]:
        out = {}
        for g in groups:
            for name, lin in zip(g.names, g.linears):
                qname = f"{self.prefix_of(i)}.{name}"
                if qname in self.planned:
                    out[name] = (qname, lin)
        return out

    def _auto_outliers(self, targets, stats, outlier_idx: dict, auto: dict, qweights,
                       groups: list[LinearGroup]) -> None:
        free = {name for name in targets
                if not (name in outlier_idx and outlier_idx[name] is not auto.get(name))  # a method's
                and name not in qweights}          # or a weight quantizer already used it
        for g in groups:                           # linears that read one input share its outliers
            names = [n for n in g.names if n in free]
            if len(names) > 1 and self.config.outlier_strategy != "calib_max":
                idx = choose_outliers(_stacked([targets[n][1] for n in names]), self.config, None)
                for n in names:
                    auto[n] = outlier_idx[n] = idx
                free -= set(names)
        for name in free:
            _q, lin = targets[name]
            auto[name] = outlier_idx[name] = choose_outliers(lin, self.config, stats.get(name))

    def __call__(self, i: int, layer: nn.Module, groups: list[LinearGroup], stats: dict) -> None:
        cfg = self.config
        self.undo.record(i, layer)
        targets = self.targets(i, groups)
        outlier_idx: dict[str, torch.Tensor] = {}
        auto: dict[str, torch.Tensor] = {}
        qweights: dict[str, quant.QTensor] = {}
        w_specs = {n: weight_spec_for(q, cfg) for n, (q, _l) in targets.items()
                   if weight_spec_for(q, cfg) is not cfg.w}
        a_bits = {n: 8 for n, s in w_specs.items() if s.bits == 8}
        input_transforms: dict[str, torch.Tensor] = {}
        self._auto_outliers(targets, stats, outlier_idx, auto, qweights, groups)
        if cfg.methods:
            ctx = _make_context(layer=layer, groups=groups, stats=stats, config=cfg, index=i,
                                qweights=qweights, outlier_idx=outlier_idx, w_specs=w_specs,
                                a_bits=a_bits, input_transforms=input_transforms)
            for method in cfg.methods:
                method.apply(ctx)
                self._auto_outliers(targets, stats, outlier_idx, auto, qweights, groups)
            qweights = ctx.qweights
            w_specs = getattr(ctx, "w_specs", w_specs)
            a_bits = getattr(ctx, "a_bits", a_bits)
            input_transforms = getattr(ctx, "input_transforms", input_transforms)
            outlier_idx = getattr(ctx, "outlier_idx", outlier_idx)
        default_bits = None if cfg.a is None else cfg.a.bits
        swaps: list[tuple[str, nn.Module]] = []
        for g in groups:
            for name in g.names:
                if name not in targets:
                    if name in input_transforms:   # a float linear whose weight was rotated
                        lin = layer.get_submodule(name)
                        swaps.append((name, RotatedInputLinear(lin, input_transforms[name])))
                    continue
                qname, lin = targets[name]
                spec = w_specs.get(name, cfg.w)
                idx = outlier_idx.get(name)
                module = quantize_linear(lin, cfg.mode, weight_spec=spec, outlier_idx=idx,
                                         act_bits=a_bits.get(name, default_bits),
                                         qweight=qweights.get(name), name=qname)
                if name in input_transforms:
                    module = RotatedInputLinear(module, input_transforms[name])
                swaps.append((name, module))
                self.report[qname] = {
                    "module": type(module).__name__,
                    "n_outliers": int(getattr(module, "n_outliers", 0)
                                      or getattr(getattr(module, "inner", None), "n_outliers", 0)),
                    "weight": None if spec is None else spec.describe(),
                    "act_bits": (a_bits.get(name, default_bits) if cfg.mode not in FLOAT_MODES
                                 else None),
                    "method_weights": name in qweights}
        for name, module in swaps:          # every module built: swap them all
            layer.set_submodule(name, module)
        self.undo.park(i)


# ------------------------------------------------------------------------------- before / after
@dataclasses.dataclass(frozen=True)
class _Target:
    """One linear `quantize` will replace: qualified name, name within its decoder layer (or
    "lm_head"), its LinearGroup kind ("lm_head" for the head), layer index (None: the head)."""

    qname: str
    name: str
    group: str
    layer: int | None
    linear: nn.Module


def _plan(model: nn.Module, adapter, config: QuantConfig) -> list[_Target]:
    """The linears `config` quantizes in `model`, checked before anything is changed.

    Candidates: every decoder-layer linear whose kind (`mixq.hf.models.linear_kind`) is in
    ``config.targets``, plus ``lm_head`` with ``quantize_lm_head``; ``config.skip`` removes some
    (the head included). Patterns are fnmatch'ed against the qualified names of the model's
    linears (every decoder-layer linear, of any kind, and "lm_head").

    Raises:
        ValueError: explicit targets (anything but all of `mixq.config.TARGETS`) name a kind
            this model family lacks; a skip or layer_overrides pattern matches no linear name
            of the model (each message names the patterns); nothing is left to quantize; the
            head is not an nn.Linear (``quantize_lm_head``).
        TypeError: a planned layer linear is not an nn.Linear (already quantized).
    """
    mtype = getattr(model.config, "model_type", type(model).__name__)
    kinds: dict[str, None] = {}
    names: list[str] = []                   # every linear of the model, for the patterns
    candidates: list[_Target] = []
    for i, layer in enumerate(adapter.layers(model)):
        for g in adapter.linear_groups(layer):
            for name, lin in zip(g.names, g.linears):
                kind, qname = linear_kind(name), f"{adapter.layer_prefix(i)}.{name}"
                kinds[kind] = None
                names.append(qname)
                if kind in config.targets:
                    candidates.append(_Target(qname, name, g.kind, i, lin))
    if set(config.targets) != set(TARGETS):
        missing = [t for t in config.targets if t not in kinds]
        if missing:
            raise ValueError(f"QuantConfig.targets {missing} match no linear of this {mtype!r} "
                             f"model: its linear kinds are {list(kinds)} (OPT's out_proj / fc1 / "
                             f"fc2 are 'o' / 'up' / 'down')")
    if adapter.lm_head(model) is not None:
        names.append("lm_head")
    if config.quantize_lm_head:
        candidates.append(_Target("lm_head", "lm_head", "lm_head", None, adapter.lm_head(model)))
    example = names[0] if names else "model.layers.0.self_attn.q_proj"
    for field, patterns in (("skip", config.skip), ("layer_overrides", config.layer_overrides)):
        unused = [p for p in patterns if not any(fnmatch(n, p) for n in names)]
        if unused:
            raise ValueError(f"QuantConfig.{field} patterns {unused} match no linear of this "
                             f"{mtype!r} model: patterns are fnmatch'ed against qualified linear "
                             f"names such as {example!r} (e.g. 'model.layers.3.*' for a whole "
                             f"layer, '*.mlp.down_proj' for one kind, 'lm_head')")
    chosen = [t for t in candidates if not any(fnmatch(t.qname, p) for p in config.skip)]
    if not chosen:
        raise ValueError(f"QuantConfig quantizes no linear of this {mtype!r} model: skip "
                         f"{list(config.skip)} removes every target ({len(candidates)} linears of "
                         f"kinds {list(config.targets)}"
                         f"{' and lm_head' if config.quantize_lm_head else ''})")
    for t in chosen:
        if t.layer is None and not isinstance(t.linear, nn.Linear):
            raise ValueError(f"quantize_lm_head: lm_head is {type(t.linear).__name__}, "
                             "not nn.Linear")
        if not isinstance(t.linear, nn.Linear):
            raise TypeError(f"{t.qname} is {type(t.linear).__name__}, not nn.Linear: "
                            "is the model already quantized?")
    return chosen


def _fills_qweight(method, name: str, group_kind: str) -> bool:
    """Whether `method` hands the linear `name` (within its layer; LinearGroup kind
    `group_kind`) method-quantized weights: its ``quantizes_weight(name, group_kind)`` (the
    weight quantizers GPTQ, Clip, AdaRound and RTN define it); methods without one fill none."""
    own = getattr(method, "quantizes_weight", None)
    return bool(own(name, group_kind)) if callable(own) else False


def _check_modules(chosen: list[_Target], config: QuantConfig) -> None:
    """Build every planned module once, on a stand-in, before the model is touched.

    For each distinct (K, weight spec, activation bits, outlier count, method weights) of the
    planned linears, `quantize_linear` -- the builder `quantize` itself calls, so its rules
    are checked, not copied -- builds the module of a float stand-in ``nn.Linear(K, r)`` (r = 1,
    or the tile height) with what the config decides for that linear: ``weight_spec_for``, 8
    activation bits for an 8-bit spec (else ``config.a.bits``), `_n_outliers` FP16 channels,
    and a stand-in QTensor (layout of `regular_weight`) when a method of ``config.methods``
    fills its weights (`_fills_qweight`). What methods decide per layer from data (LayerwiseQuant
    specs, OutlierChannels outliers, AWQDynamic group sizes) is not known here; `quantize`
    restores the model if such a module cannot be built (`_Undo`).

    Raises:
        ValueError / TypeError: the builder's refusal, with the linear and the plan appended.
    """
    default_bits = None if config.a is None else config.a.bits
    seen: set[tuple] = set()
    for t in chosen:
        spec = weight_spec_for(t.qname, config)
        k_in = int(t.linear.in_features)
        n_out = 0 if t.layer is None else _n_outliers(k_in, config)
        act = 8 if spec is not None and spec.bits == 8 else default_bits
        by = [] if t.layer is None else [type(m).__name__ for m in config.methods
                                         if _fills_qweight(m, t.name, t.group)]
        key = (k_in, spec, act, n_out, bool(by))
        if key in seen:
            continue
        seen.add(key)
        rows = spec.tile[0] if spec is not None and spec.granularity == "tile" else 1
        stand_in = nn.Linear(k_in, rows, bias=False)
        nn.init.constant_(stand_in.weight, 1.0)
        idx = torch.arange(n_out, dtype=torch.int64)
        qweight = None
        if by and spec is not None:
            w_reg, _perm = regular_weight(stand_in, idx, spec)
            qweight = quant.quantize(w_reg, spec, scale_dtype=torch.float16)
        try:
            quantize_linear(stand_in, config.mode, weight_spec=spec, act_bits=act,
                            outlier_idx=idx, qweight=qweight, name=t.qname)
        except (TypeError, ValueError) as e:
            plan = (f"weight {spec.describe() if spec is not None else 'float'}, activation bits "
                    f"{act}, {n_out} FP16 outlier channels"
                    + (f", weights quantized by {', '.join(by)}" if by else ""))
            raise type(e)(f"{e} [config check before quantizing, the model is unchanged: "
                          f"{t.qname} would be built with {plan}; change what the config gives "
                          f"this linear: its layer_overrides entry, skip, the methods or the "
                          f"mode]") from None


class _Undo:
    """What `quantize` changes, so that a failure part-way can put it back.

    Per decoder layer, before its methods run (`record`): the layer's submodule objects by
    name and, when ``copy_values`` (config.methods: they edit float weights and norms in
    place), a CPU copy of every parameter and buffer. After the swap, replaced modules go back
    to the layer's home device (`park`), so calibrating on another device does not pile them
    up there. `restore` puts the recorded modules back at their names, copies the recorded
    values into them, moves the layer home, and undoes lm_head, the model attributes
    `quantize` sets, quantized attention and the train/eval flags. Costs: the replaced float
    modules stay alive until `quantize` returns (plus the CPU copy with methods).
    """

    _ATTRS = (CONFIG_ATTR, "mixq_report", "mixq_layer_errors", FUSED_NORMS_ATTR)

    def __init__(self, model: nn.Module, layers: nn.ModuleList, copy_values: bool) -> None:
        self.model, self.layers, self.copy_values = model, layers, copy_values
        self.homes = [next(layer.parameters(), torch.empty(0)).device for layer in layers]
        self.training = {m: m.training for m in model.modules()}
        self.attrs = {a: model.__dict__[a] for a in self._ATTRS if a in model.__dict__}
        self.had_attention = hasattr(model, "_mixq_prev_attn")
        self.saved: dict[int, tuple[dict, dict | None]] = {}
        self.head = None

    def record(self, i: int, layer: nn.Module) -> None:
        if i in self.saved:
            return
        mods = dict(layer.named_modules())
        values = None
        if self.copy_values:
            values = {}
            for n, m in mods.items():
                for kind, store in (("param", m._parameters), ("buffer", m._buffers)):
                    for k, t in store.items():
                        values[(n, k)] = (kind, None if t is None else t.detach().to(
                            "cpu", copy=True), t is not None and t.requires_grad,
                            k not in m._non_persistent_buffers_set)
        self.saved[i] = (mods, values)

    def park(self, i: int) -> None:
        live = {id(m) for m in self.layers[i].modules()}
        for m in self.saved[i][0].values():
            if id(m) not in live:
                m.to(self.homes[i])

    def record_head(self) -> None:
        self.head = (self.model.lm_head, getattr(self.model.config, "tie_word_embeddings", None))

    def _restore_layer(self, i: int) -> None:
        mods, values = self.saved[i]
        layer = self.layers[i]
        for n in sorted((n for n in mods if n), key=lambda n: n.count(".")):   # parents first
            try:
                same = layer.get_submodule(n) is mods[n]
            except AttributeError:
                same = False
            if not same:
                layer.set_submodule(n, mods[n])
        if values is not None:
            with torch.no_grad():
                for (n, k), (kind, v, grad, persistent) in values.items():
                    m = mods[n]
                    store = m._parameters if kind == "param" else m._buffers
                    cur = store.get(k)
                    if v is None:
                        store[k] = None
                    elif (cur is not None and cur.shape == v.shape and cur.dtype == v.dtype
                          and cur.device.type != "meta"):
                        cur.copy_(v)
                    elif kind == "param":
                        store[k] = nn.Parameter(v.to(self.homes[i]), requires_grad=grad)
                    else:
                        m.register_buffer(k, v.to(self.homes[i]), persistent=persistent)
                for n, m in mods.items():            # tensors a method added
                    for kind, store in (("param", m._parameters), ("buffer", m._buffers)):
                        for k in [k for k in store if (n, k) not in values]:
                            del store[k]
                            m._non_persistent_buffers_set.discard(k)
        layer.to(self.homes[i])

    def restore(self) -> None:
        model = self.model
        for i in sorted(self.saved):
            self._restore_layer(i)
        for i, layer in enumerate(self.layers):     # a layer moved for calibration, unrecorded
            if i not in self.saved:
                layer.to(self.homes[i])
        if self.head is not None:
            model.lm_head = self.head[0]
            if self.head[1] is not None:
                model.config.tie_word_embeddings = self.head[1]
        if not self.had_attention and hasattr(model, "_mixq_prev_attn"):
            disable_quantized_attention(model)
        for a in self._ATTRS:
            if a in self.attrs:
                setattr(model, a, self.attrs[a])
            elif a in model.__dict__:
                delattr(model, a)
        for m, flag in self.training.items():
            m.training = flag


def _needs_calibration(config: QuantConfig) -> bool:
    return bool(config.methods) or (config.outlier_frac > 0
                                    and config.outlier_strategy == "calib_max")


_HESSIAN_METHODS = ("GPTQ", "Clip")


@torch.no_grad()
def quantize(model: nn.Module, config: QuantConfig, calib_data: torch.Tensor | None = None, *,
             device=None, batch_size: int = 1, max_rows: int = 4096,
             progress: bool = True, layer_errors: bool = True) -> nn.Module:
    """Quantize the linears of a Hugging Face causal LM in place and return it.

    Args:
        model: a supported causal LM (`mixq.hf.models.SUPPORTED_MODEL_TYPES`), float weights.
        config: a `QuantConfig`.
        calib_data: int64 token ids (n, T) (e.g. `mixq.calibrate.calibration_batches`), or a
            sequence of such tensors. Required when outliers come from calibration
            ("calib_max" with outlier_frac > 0) or config.methods is not empty (methods see
            the layer's statistics); without it, RTN runs layer by layer on the weights.
        device: where each layer is processed (default: the model's device).
        batch_size: calibration rows per forward call.
        max_rows: input rows kept per linear for the methods (`LinearStats.inputs`).
        progress: tqdm bars.
        layer_errors: with calibration data, measure each decoder layer's own error (its
            residual update against a float copy on the first calibration batch; see
            `mixq.calibrate.calibrate_layerwise`) into ``model.mixq_layer_errors``.
    Returns:
        `model`, with target linears (minus ``config.skip``; lm_head with
        ``quantize_lm_head`` unless skipped) replaced by `mixq.nn` modules and
        ``model.mixq_config`` set to `config` (plus ``model.mixq_report``: per linear module type / outliers, and
        ``model.mixq_layer_errors``: a list of ``{layer, rel_err, update_norm}``, empty
        without calibration data). Then `apply_full_architecture`: quantized attention
        (``config.attention``; ``model.config._attn_implementation == "mixq"``) and fused
        norms (``config.fuse_norm``; report in ``model.mixq_fused_norms``). The KV cache of
        ``config.kv_cache`` comes from `make_cache`.
    Checks before anything is changed (so a refusal leaves the model as it was):
        the targets, skip and layer_overrides patterns (`_plan`: each must match a linear of
        this model, and some linear must be quantized), and every planned module, built once on
        a stand-in by the same builder (`_check_modules`: e.g. GPTQ together with an 8-bit
        override is refused here, not at that layer).
    Failure part-way: what only shows while a layer is processed -- a refusal that depends on
        a method's per-layer decisions (LayerwiseQuant specs, OutlierChannels outliers,
        AWQDynamic group sizes), numerical errors (a singular Hessian, non-finite weights),
        running out of memory, KeyboardInterrupt -- restores every layer processed so far
        (modules and, with methods, their float weights and norms), lm_head, quantized
        attention and the model attributes, then re-raises (`_Undo`). For this the replaced
        float modules stay alive until `quantize` returns, and with methods a CPU copy of each
        processed layer's tensors is kept.
    Raises:
        TypeError: model not an nn.Module / config not a QuantConfig / config.attention set
            for a model that is not a transformers PreTrainedModel / a planned linear is not
            an nn.Linear (already quantized).
        ValueError: unsupported family, already quantized, calibration data missing or
            malformed, patterns that match nothing (`_plan`), a module the builder refuses
            (`_check_modules`).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a mixq.QuantConfig, got {type(config).__name__}")
    adapter = get_adapter(model)
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("model is already quantized by mixq (model.mixq_config is set)")
    _check_full_architecture(model, config)     # fail before the (long) layer loop
    if calib_data is None and _needs_calibration(config):
        raise ValueError("this config needs calibration data (outlier_strategy='calib_max' with "
                         "outlier_frac > 0, or methods): pass calib_data=token ids (n, T), e.g. "
                         "mixq.calibrate.calibration_batches(tokenizer)")
    chosen = _plan(model, adapter, config)
    _check_modules(chosen, config)
    layers = adapter.layers(model)
    undo = _Undo(model, layers, copy_values=bool(config.methods))
    worker = _LayerQuantizer(config, adapter.layer_prefix, {t.qname for t in chosen}, undo)
    errors: list[dict] = []
    try:
        model.eval()
        if calib_data is not None:
            collect_h = any(getattr(m, "needs_hessian", type(m).__name__ in _HESSIAN_METHODS)
                            for m in config.methods)
            calibrate_layerwise(model, calib_data, on_layer=worker, collect_hessian=collect_h,
                                max_rows=max_rows, device=device, batch_size=batch_size,
                                progress=progress, layer_errors=errors if layer_errors else None)
        else:
            for i in tqdm(range(len(layers)), desc="quantize layers", disable=not progress):
                layer = layers[i]
                if device is not None:
                    layer.to(device)
                worker(i, layer, adapter.linear_groups(layer), {})
                layer.to(undo.homes[i])
        if any(t.layer is None for t in chosen):
            undo.record_head()
            _quantize_lm_head(model, adapter, config, worker.report)
        setattr(model, CONFIG_ATTR, config)
        model.mixq_report = worker.report
        model.mixq_layer_errors = errors
        apply_full_architecture(model, config)
    except BaseException as e:
        try:
            undo.restore()
        except Exception as r:          # pragma: no cover - the restore itself failed
            note = (f"mixq.quantize could not restore the model after this error ({r!r}): "
                    "reload it")
            if hasattr(e, "add_note"):
                e.add_note(note)
            else:                       # Python 3.10
                warnings.warn(note, stacklevel=2)
        raise
    return model


# ------------------------------------------------------------------------------- full architecture
def _check_full_architecture(model: nn.Module, config: QuantConfig) -> None:
    if config.attention is not None and not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"config.attention needs a transformers PreTrainedModel (with "
                        f"set_attn_implementation), got {type(model).__name__}")


def _merge_report(model: nn.Module, attr: str, new: dict[str, str], again: str) -> dict:
    """Merge a fusion pass's report `new` into ``model.<attr>`` and return it: a second call
    keeps the first entry where it now only says `again` (e.g. "skipped: already fused")."""
    report = dict(getattr(model, attr, None) or {})
    for name, what in new.items():
        if name not in report or what != again:
            report[name] = what
    setattr(model, attr, report)
    return report


def apply_full_architecture(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Switch on the parts of `config` beyond the linears, in place; returns `model`.

    * ``config.attention``: `mixq.hf.attention.enable_quantized_attention` (attention function
      "mixq", per-module config and cache hooks).
    * ``config.fuse_projections``: `mixq.hf.projection_fusion.fuse_projections` (non-strict;
      report in ``model.mixq_fused_projections``), before the norms, so that a fused norm hands
      its payload to the stacks.
    * ``config.fuse_norm``: `mixq.hf.norm_fusion.fuse_norm_quant` (non-strict); its report goes to
      ``model.mixq_fused_norms``. A warning is issued when no norm could be fused.

    Called by `quantize` (after the linears are swapped) and `mixq.io.load_quantized`; neither
    changes a tensor of the state_dict, so saved weights stay valid.

    Args:
        model: a causal LM whose linears `quantize` has already swapped (or the loaded copy).
        config: its QuantConfig.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a mixq.QuantConfig, got {type(config).__name__}")
    _check_full_architecture(model, config)
    if config.attention is not None:
        enable_quantized_attention(model, config.attention)
    if config.fuse_projections:
        _merge_report(model, FUSED_PROJECTIONS_ATTR, fuse_projections(model),
                      "skipped: already stacked")
    if config.fuse_norm:
        report = _merge_report(model, FUSED_NORMS_ATTR, fuse_norm_quant(model),
                               "skipped: already fused")
        if report and not any(v.startswith("fused") for v in report.values()):
            name, why = next(iter(report.items()))
            warnings.warn(f"config.fuse_norm: no norm could be fused (e.g. {name}: {why})",
                          stacklevel=3)
    return model


def make_cache(model: nn.Module, *, kv_cache: KVCacheSpec | None = None,
               check_finite: bool = False, dequantized_reads: bool = False):
    """The KV cache ``config.kv_cache`` asks for, for ``model.generate(past_key_values=...)``.

    Args:
        model: a model quantized by `quantize` (or loaded by `mixq.io.load_quantized`).
        kv_cache: a `KVCacheSpec` to use instead of the config's (e.g. to study a 4-bit cache
            on a model quantized without one); None = ``model.mixq_config.kv_cache``.
        check_finite: reject NaN/Inf keys/values on every update (a device sync per layer and
            step: a debugging aid, off by default).
        dequantized_reads: attention reads the cache's dequantized K/V also for the tokens of
            the current call (accuracy measurement of a full-sequence forward; see
            `mixq.hf.kv_cache`).
    Returns:
        a fresh `mixq.hf.kv_cache.KV4Cache` (``model.config``, ``bits`` and ``group_size`` of
        `kv_cache` or ``model.mixq_config.kv_cache``), or None when neither is set (then
        ``generate`` uses its default float cache). With a cache, `model` is also set up by
        `mixq.hf.kv_cache.guard_generate` (once): the cache records the token ids it is fed,
        and a later ``generate(prompt, past_key_values=cache)`` continues the held sequence
        only when `prompt` starts with it (else ValueError; ``cache.reset()`` or a fresh cache
        for a new prompt).
    Raises:
        ValueError: `model` was not quantized by mixq.
    """
    config = getattr(model, CONFIG_ATTR, None)
    if not isinstance(config, QuantConfig):
        raise ValueError("model has no mixq_config: quantize it with mixq.quantize "
                         "(or load it with mixq.load_quantized) first")
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
    if not isinstance(dequantized_reads, bool):
        raise TypeError(f"dequantized_reads must be a bool, got {dequantized_reads!r}")
    if kv_cache is not None and not isinstance(kv_cache, KVCacheSpec):
        raise TypeError(f"kv_cache must be a mixq.KVCacheSpec or None, "
                        f"got {type(kv_cache).__name__}")
    spec = config.kv_cache if kv_cache is None else kv_cache
    if spec is None:
        return None
    cache = KV4Cache(model.config, bits=spec.bits, group_size=spec.group_size,
                     check_finite=check_finite,
                     dequantized_reads=dequantized_reads)
    if callable(getattr(type(model), "generate", None)):
        guard_generate(model)
    return cache


def _quantize_lm_head(model: nn.Module, adapter, config: QuantConfig, report: dict) -> None:
    """lm_head with the mode's module and ``config.w`` (no outliers: no calibration stats);
    a tied embedding keeps its float weight (only the output projection is replaced)."""
    head = adapter.lm_head(model)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"quantize_lm_head: lm_head is {type(head).__name__}, not nn.Linear")
    spec = weight_spec_for("lm_head", config)
    module = quantize_linear(head, config.mode, weight_spec=spec, outlier_idx=None,
                             name="lm_head", act_bits=None if config.a is None else config.a.bits)
    model.lm_head = module
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False   # the head is no longer the embedding matrix
    report["lm_head"] = {"module": type(module).__name__, "n_outliers": 0,
                         "weight": None if spec is None else spec.describe(),
                         "method_weights": False}
