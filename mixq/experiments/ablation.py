"""Layer-sensitivity ablation: quantize one linear kind or one decoder block at a time.

Which part of a model does quantization hurt most? For each *what* (a linear kind such as "down",
or a decoder block such as "model.layers.3") a fresh float model is quantized with `config`
restricted to that part only, everything else stays float, and `evaluate(model)` scores it
(typically perplexity). Rows are compared with the float model::

    delta_vs_float(what) = evaluate(quantize_only(what)) - evaluate(float)

A large delta marks a sensitive part: candidates for FP16 / W8A8 (``QuantConfig.skip`` /
``layer_overrides``, `mixq.methods.LayerwiseQuant`) or for a stronger method.

Restriction uses what `mixq.quantize` supports: ``by="kind"`` sets ``QuantConfig.targets`` to
the one kind (the model's own kind names, `mixq.models.linear_kind`: Llama q, k, v, o, gate, up,
down; OPT q, k, v, out, fc1, fc2); ``by="block"`` adds fnmatch patterns of every *other* block
(``"<prefix>.*"``, e.g. ``"model.layers.1.*"``) to ``QuantConfig.skip``. Methods in
``config.methods`` still run on every layer (transforms keep the float function), only the
targeted linears are replaced by quantized modules.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from tqdm.auto import tqdm

from mixq.config import QuantConfig

__all__ = ["layer_sensitivity", "model_kinds"]


def model_kinds(model) -> list[str]:
    """Linear kinds of `model`'s decoder layers, in layer order (`mixq.models.linear_kind`)."""
    from mixq.models import get_adapter, linear_kind
    adapter = get_adapter(model)
    kinds: dict[str, None] = {}
    for layer in adapter.layers(model):
        for g in adapter.linear_groups(layer):
            for n in g.names:
                kinds.setdefault(linear_kind(n), None)
    return list(kinds)


def _value(result) -> float:
    """evaluate()'s result as a float (a number, or a dict with "ppl")."""
    if isinstance(result, dict):
        if "ppl" not in result:
            raise ValueError(f"evaluate() returned a dict without 'ppl': keys {sorted(result)}")
        result = result["ppl"]
    try:
        return float(result)
    except (TypeError, ValueError):
        raise TypeError(f"evaluate() must return a number or a dict with 'ppl', "
                        f"got {type(result).__name__}") from None


def layer_sensitivity(model_factory: Callable[[], object], evaluate: Callable[[object], object], *,
                      config: QuantConfig, by: str = "kind", calib_data=None,
                      progress: bool = True, include_all: bool = True,
                      quantize_kw: dict | None = None) -> list[dict]:
    """Score the model with one part quantized at a time.

    Args:
        model_factory: ``() -> model``: a *fresh* float causal LM per call (it is quantized in
            place).
        evaluate: ``(model) -> float`` or a dict with "ppl" (e.g. `mixq.eval.perplexity`);
            lower is better is not assumed, deltas are plain differences.
        config: the `QuantConfig` applied to each part (its targets / skip are narrowed).
        by: "kind" (one row per linear kind of the model present in ``config.targets``) or
            "block" (one row per decoder block).
        calib_data: token ids for `mixq.quantize` (needed with methods / calib outliers).
        progress: a tqdm bar over the rows (`mixq.quantize`'s own bars are off).
        include_all: also a row "all" with the whole `config` applied.
        quantize_kw: extra keyword arguments for `mixq.quantize` (device, max_rows, ...).
    Returns:
        list of dicts ``{"what", "ppl", "delta_vs_float", "n_quantized"}``: first the baseline
        ``what="float"`` (delta 0, n_quantized 0), then one row per part (``"kind:down"`` /
        ``"block:3"``), then ``"all"`` if asked. ``ppl`` holds evaluate()'s value.
    Raises:
        ValueError: bad `by`, or nothing to ablate.
        TypeError: config not a QuantConfig, factories / evaluate not callable.
    """
    from mixq.api import quantize
    from mixq.models import get_adapter

    if by not in ("kind", "block"):
        raise ValueError(f"by must be 'kind' or 'block', got {by!r}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a mixq.QuantConfig, got {type(config).__name__}")
    if not callable(model_factory) or not callable(evaluate):
        raise TypeError("model_factory and evaluate must be callables")
    qkw = dict(quantize_kw or {})
    qkw.setdefault("progress", False)

    base_model = model_factory()
    adapter = get_adapter(base_model)
    if by == "kind":
        parts = [k for k in model_kinds(base_model) if k in config.targets]
        variants = [(f"kind:{k}", dataclasses.replace(config, targets=(k,))) for k in parts]
    else:
        n_layers = len(adapter.layers(base_model))
        variants = []
        for i in range(n_layers):
            others = tuple(f"{adapter.layer_prefix(j)}.*" for j in range(n_layers) if j != i)
            variants.append((f"block:{i}", dataclasses.replace(config, skip=config.skip + others)))
    if not variants:
        raise ValueError(f"nothing to ablate: config.targets {config.targets} match no linear kind "
                         f"of the model {model_kinds(base_model)}")
    if include_all:
        variants.append(("all", config))

    ref = _value(evaluate(base_model))
    del base_model
    rows = [{"what": "float", "ppl": ref, "delta_vs_float": 0.0, "n_quantized": 0}]
    for what, cfg in tqdm(variants, desc=f"sensitivity by {by}", disable=not progress):
        model = quantize(model_factory(), cfg, calib_data, **qkw)
        val = _value(evaluate(model))
        rows.append({"what": what, "ppl": val,
                     "delta_vs_float": val - ref if math.isfinite(val) else math.inf,
                     "n_quantized": len(getattr(model, "mixq_report", {}))})
        del model
    return rows
