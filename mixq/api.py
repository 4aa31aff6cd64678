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
the activation quantization of their W4A4 consumers (`mixq.hf.norm_fusion.fuse_norm_quant`), and
``config.kv_cache`` is what `make_cache` builds for ``generate(past_key_values=...)``.
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
from mixq.config import FLOAT_MODES, QuantConfig, QuantSpec
from mixq.hf.models import LinearGroup, get_adapter, linear_kind
from mixq.hf.attention import enable_quantized_attention
from mixq.hf.kv_cache import KV4Cache
from mixq.hf.norm_fusion import fuse_norm_quant
from mixq.nn import QuantLinearBase, RotatedInputLinear, quantize_linear

__all__ = ["quantize", "choose_outliers", "weight_spec_for", "regular_weight", "is_quantized",
           "CONFIG_ATTR", "FUSED_NORMS_ATTR", "apply_full_architecture", "make_cache"]

#: Attribute set on a quantized model: its `QuantConfig` (read by `mixq.io.save_quantized`).
CONFIG_ATTR = "mixq_config"
#: Attribute set when ``config.fuse_norm``: {norm name: "fused -> ..." | "skipped: why"}.
FUSED_NORMS_ATTR = "mixq_fused_norms"


# ------------------------------------------------------------------------------- per-linear pieces
def weight_spec_for(qualified_name: str, config: QuantConfig) -> QuantSpec | None:
    """The weight QuantSpec of a linear: the first matching ``layer_overrides`` pattern, else
    ``config.w`` (None in mode fp16)."""
    for pattern, spec in config.layer_overrides.items():
        if fnmatch(qualified_name, pattern):
            return spec
    return config.w


def choose_outliers(linear: nn.Linear, config: QuantConfig,
                    stats: LinearStats | None) -> torch.Tensor:
    """FP16 outlier input channels of one linear, int64 (k,) ascending, k = ceil(frac * K).

    "calib_max": the k channels with the largest calibration max |x| (`stats.absmax`);
    "max" / "mean3std" / "argmax": salient weight channels (`outliers.salient_weight_channels`).
    k is capped at K - 1 (at least one channel stays int4). Empty when ``outlier_frac == 0``.
    """
    k_in = linear.in_features
    if config.outlier_frac == 0.0 or config.mode != "w4a4":
        return torch.empty(0, dtype=torch.int64)
    k = min(math.ceil(config.outlier_frac * k_in - 1e-9), k_in - 1)
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
    block = {"group": spec.group_size, "tile": spec.tile[1]}.get(spec.granularity, 1)
    kp = math.ceil(kq / block) * block
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


class _LayerQuantizer:
    """The ``on_layer`` callback of `quantize`: methods, outliers, module swap for one layer.

    Outlier channels follow the *current* statistics: they are chosen from ``stats`` before the
    first method and re-chosen after each method (transforms keep ``stats`` in the weight's
    basis), except for linears a method has committed: an explicit ``ctx.outlier_idx`` entry
    (OutlierChannels) or method-quantized weights (``ctx.qweights``, GPTQ/clip: their int4 columns
    depend on the outliers they saw).
    """

    def __init__(self, config: QuantConfig, prefix_of) -> None:
        self.config, self.prefix_of = config, prefix_of
        self.report: dict[str, dict] = {}

    def targets(self, i: int, groups: list[LinearGroup]) -> dict[str, tuple[str, nn.Linear]]:
        out = {}
        for g in groups:
            for name, lin in zip(g.names, g.linears):
                qname = f"{self.prefix_of(i)}.{name}"
                if linear_kind(name) not in self.config.targets:
                    continue
                if any(fnmatch(qname, p) for p in self.config.skip):
                    continue
                if not isinstance(lin, nn.Linear):
                    raise TypeError(f"{qname} is {type(lin).__name__}, not nn.Linear: "
                                    "is the model already quantized?")
                out[name] = (qname, lin)
        return out

    def _auto_outliers(self, targets, stats, outlier_idx: dict, auto: dict, qweights) -> None:
        for name, (_q, lin) in targets.items():
            if name in outlier_idx and outlier_idx[name] is not auto.get(name):
                continue                    # set by a method
            if name in qweights:
                continue                    # a weight quantizer already used it
            auto[name] = outlier_idx[name] = choose_outliers(lin, self.config, stats.get(name))

    def __call__(self, i: int, layer: nn.Module, groups: list[LinearGroup], stats: dict) -> None:
        cfg = self.config
        targets = self.targets(i, groups)
        outlier_idx: dict[str, torch.Tensor] = {}
        auto: dict[str, torch.Tensor] = {}
        qweights: dict[str, quant.QTensor] = {}
        w_specs = {n: weight_spec_for(q, cfg) for n, (q, _l) in targets.items()
                   if weight_spec_for(q, cfg) is not cfg.w}
        a_bits = {n: 8 for n, s in w_specs.items() if s.bits == 8}
        input_transforms: dict[str, torch.Tensor] = {}
        self._auto_outliers(targets, stats, outlier_idx, auto, qweights)
        if cfg.methods:
            ctx = _make_context(layer=layer, groups=groups, stats=stats, config=cfg, index=i,
                                qweights=qweights, outlier_idx=outlier_idx, w_specs=w_specs,
                                a_bits=a_bits, input_transforms=input_transforms)
            for method in cfg.methods:
                method.apply(ctx)
                self._auto_outliers(targets, stats, outlier_idx, auto, qweights)
            qweights = ctx.qweights
            w_specs = getattr(ctx, "w_specs", w_specs)
            a_bits = getattr(ctx, "a_bits", a_bits)
            input_transforms = getattr(ctx, "input_transforms", input_transforms)
            outlier_idx = getattr(ctx, "outlier_idx", outlier_idx)
        default_bits = None if cfg.a is None else cfg.a.bits
        for g in groups:
            for name in g.names:
                if name not in targets:
                    if name in input_transforms:   # a float linear whose weight was rotated
                        lin = layer.get_submodule(name)
                        layer.set_submodule(name, RotatedInputLinear(lin, input_transforms[name]))
                    continue
                qname, lin = targets[name]
                spec = w_specs.get(name, cfg.w)
                idx = outlier_idx.get(name)
                module = quantize_linear(lin, cfg.mode, weight_spec=spec, outlier_idx=idx,
                                         act_bits=a_bits.get(name, default_bits),
                                         qweight=qweights.get(name), name=qname)
                if name in input_transforms:
                    module = RotatedInputLinear(module, input_transforms[name])
                layer.set_submodule(name, module)
                self.report[qname] = {
                    "module": type(module).__name__,
                    "n_outliers": int(getattr(module, "n_outliers", 0)
                                      or getattr(getattr(module, "inner", None), "n_outliers", 0)),
                    "weight": None if spec is None else spec.describe(),
                    "act_bits": (a_bits.get(name, default_bits) if cfg.mode not in FLOAT_MODES
                                 else None),
                    "method_weights": name in qweights}


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
        `model`, with target linears replaced by `mixq.nn` modules and ``model.mixq_config``
        set to `config` (plus ``model.mixq_report``: per linear module type / outliers, and
        ``model.mixq_layer_errors``: a list of ``{layer, rel_err, update_norm}``, empty
        without calibration data). Then `apply_full_architecture`: quantized attention
        (``config.attention``; ``model.config._attn_implementation == "mixq"``) and fused
        norms (``config.fuse_norm``; report in ``model.mixq_fused_norms``). The KV cache of
        ``config.kv_cache`` comes from `make_cache`.
    Raises:
        TypeError: model not an nn.Module / config not a QuantConfig / config.attention set
            for a model that is not a transformers PreTrainedModel.
        ValueError: unsupported family, already quantized, calibration data missing or malformed.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a mixq.QuantConfig, got {type(config).__name__}")
    adapter = get_adapter(model)
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("model is already quantized by mixq (model.mixq_config is set)")
    _check_full_architecture(model, config)     # fail before the (long) layer loop
    layers = adapter.layers(model)
    model.eval()
    worker = _LayerQuantizer(config, adapter.layer_prefix)
    errors: list[dict] = []
    if calib_data is None and _needs_calibration(config):
        raise ValueError("this config needs calibration data (outlier_strategy='calib_max' with "
                         "outlier_frac > 0, or methods): pass calib_data=token ids (n, T), e.g. "
                         "mixq.calibrate.calibration_batches(tokenizer)")
    if calib_data is not None:
        collect_h = any(getattr(m, "needs_hessian", type(m).__name__ in _HESSIAN_METHODS)
                        for m in config.methods)
        calibrate_layerwise(model, calib_data, on_layer=worker, collect_hessian=collect_h,
                            max_rows=max_rows, device=device, batch_size=batch_size,
                            progress=progress, layer_errors=errors if layer_errors else None)
    else:
        for i in tqdm(range(len(layers)), desc="quantize layers", disable=not progress):
            layer = layers[i]
            home = next(layer.parameters()).device
            if device is not None:
                layer.to(device)
            worker(i, layer, adapter.linear_groups(layer), {})
            layer.to(home)
    if config.quantize_lm_head:
        _quantize_lm_head(model, adapter, config, worker.report)
    setattr(model, CONFIG_ATTR, config)
    model.mixq_report = worker.report
    model.mixq_layer_errors = errors
    apply_full_architecture(model, config)
    return model


# ------------------------------------------------------------------------------- full architecture
def _check_full_architecture(model: nn.Module, config: QuantConfig) -> None:
    if config.attention is not None and not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"config.attention needs a transformers PreTrainedModel (with "
                        f"set_attn_implementation), got {type(model).__name__}")


def apply_full_architecture(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Switch on the parts of `config` beyond the linears, in place; returns `model`.

    * ``config.attention``: `mixq.hf.attention.enable_quantized_attention` (attention function
      "mixq", per-module config and cache hooks).
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
    if config.fuse_norm:
        report = dict(getattr(model, FUSED_NORMS_ATTR, None) or {})
        for name, what in fuse_norm_quant(model).items():   # a second call keeps the first report
            if name not in report or what != "skipped: already fused":
                report[name] = what
        setattr(model, FUSED_NORMS_ATTR, report)
        if report and not any(v.startswith("fused") for v in report.values()):
            name, why = next(iter(report.items()))
            warnings.warn(f"config.fuse_norm: no norm could be fused (e.g. {name}: {why})",
                          stacklevel=3)
    return model


def make_cache(model: nn.Module, *, check_finite: bool = True, dequantized_reads: bool = False):
    """The KV cache ``config.kv_cache`` asks for, for ``model.generate(past_key_values=...)``.

    Args:
        model: a model quantized by `quantize` (or loaded by `mixq.io.load_quantized`).
        check_finite: reject NaN/Inf keys/values on every update (a device sync per layer and
            step; pass False for fast GPU decoding).
        dequantized_reads: attention reads the cache's dequantized K/V also for the tokens of
            the current call (accuracy measurement of a full-sequence forward; see
            `mixq.hf.kv_cache`).
    Returns:
        a fresh `mixq.hf.kv_cache.KV4Cache` (``model.config``, ``bits`` and ``group_size`` of
        ``model.mixq_config.kv_cache``), or None when the config has no ``kv_cache`` (then
        ``generate`` uses its default float cache). Use one cache per generate() call.
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
    if config.kv_cache is None:
        return None
    return KV4Cache(model.config, bits=config.kv_cache.bits,
                    group_size=config.kv_cache.group_size, check_finite=check_finite,
                    dequantized_reads=dequantized_reads)


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
