"""Layer-sensitivity ablation (``python -m mixq ablation``): quantize one linear kind or one
decoder block at a time.

``python -m mixq ablation --model smollm2 --preset w4a4-rtn --by kind --max-windows 4
--json results/ablation_smollm2_cpu.json``

Which part of a model does quantization hurt most? For each *what* (a linear kind such as "down",
or a decoder block such as "model.layers.3") a fresh float model is quantized with `config`
restricted to that part only, everything else stays float, and `evaluate(model)` scores it
(typically perplexity). Rows are compared with the float model::

    delta_vs_float(what) = evaluate(quantize_only(what)) - evaluate(float)

A large delta marks a sensitive part: candidates for FP16 / W8A8 (``QuantConfig.skip`` /
``layer_overrides``, `mixq.methods.LayerwiseQuant`) or for a stronger method.

Restriction uses what `mixq.quantize` supports: ``by="kind"`` sets ``QuantConfig.targets`` to
the one kind (`mixq.hf.models.linear_kind`: q, k, v, o, gate, up, down; OPT has no gate, its
out_proj / fc1 / fc2 are o / up / down); ``by="block"`` adds fnmatch patterns of every *other*
block (``"<prefix>.*"``, e.g. ``"model.layers.1.*"``) to ``QuantConfig.skip``. Methods in
``config.methods`` still run on every layer (transforms keep the float function), only the
targeted linears are replaced by quantized modules.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Callable

from tqdm.auto import tqdm

from mixq.config import QuantConfig
from mixq.experiments.common import (add_common_flags, command_parser, default_device, environment,
                                     torch_dtype, write_results)
from mixq.hf.models import get_adapter, linear_kind

__all__ = ["layer_sensitivity", "model_kinds", "run_ablation", "build_parser", "main"]


def model_kinds(model) -> list[str]:
    """Linear kinds of `model`'s decoder layers, in layer order (`mixq.hf.models.linear_kind`)."""
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


def run_ablation(model_name: str, preset_name: str, *, by: str = "kind",
                 include_all: bool = True, n_calib: int = 0, calib_seqlen: int = 2048,
                 seqlen: int | None = None, max_windows: int | None = None, device=None,
                 dtype=None, json_path=None, progress: bool = True) -> tuple[list[dict], dict]:
    """`layer_sensitivity` of a model under a preset, scored by WikiText-2 test perplexity.

    Args:
        model_name: anything `mixq.io.load_model` takes; the float model is loaded once and
            deep-copied for every row.
        preset_name: a `mixq.presets` name (its config is narrowed per row).
        by, include_all: see `layer_sensitivity`.
        n_calib, calib_seqlen: calibration windows of WikiText-2 valid (0: none; presets with
            calibration outliers or methods need them).
        seqlen, max_windows: the perplexity windows (`mixq.eval.perplexity`).
        device, dtype: of the float model (default CUDA when present; fp32).
        json_path: rows and meta written there (`mixq.experiments.common.write_results`).
    Returns:
        ``(rows, meta)``: the `layer_sensitivity` rows with model, preset and the environment.
    """
    from mixq.calibrate import calibration_batches
    from mixq.eval import perplexity
    from mixq.io import load_model
    from mixq.presets import preset

    config = preset(preset_name)
    t0 = time.perf_counter()
    device = default_device(device)
    model, tok = load_model(model_name, dtype=dtype or torch_dtype("fp32"), device=device)
    calib = calibration_batches(tok, n_samples=n_calib, seqlen=calib_seqlen) if n_calib else None

    def score(m):
        return perplexity(m, tok, seqlen=seqlen, max_windows=max_windows, progress=False)

    rows = layer_sensitivity(lambda: copy.deepcopy(model), score, config=config, by=by,
                             calib_data=calib, progress=progress, include_all=include_all,
                             quantize_kw={"device": device})
    env = environment(device)
    rows = [{**r, "model": model_name, "preset": preset_name, **env} for r in rows]
    windows = "all" if max_windows is None else f"first {max_windows}"
    meta = {"model": model_name, "preset": preset_name, "by": by, "n_calib": n_calib,
            "eval": f"{windows} windows of WikiText-2 test (seqlen {seqlen or 'default'})",
            "seconds": round(time.perf_counter() - t0, 1), **env}
    if json_path:
        write_results(json_path, rows, meta)
    return rows, meta


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m mixq ablation``."""
    p = command_parser("ablation", "perplexity with one linear kind or decoder block "
                                   "quantized at a time")
    add_common_flags(p, "model", "device", "dtype", "json", "quiet", model={"required": True},
                     dtype={"default": "fp32"})
    p.add_argument("--preset", required=True, help="the preset applied to each part")
    p.add_argument("--by", default="kind", choices=["kind", "block"],
                   help="one row per linear kind or per decoder block")
    p.add_argument("--all", action=argparse.BooleanOptionalAction, default=True,
                   help="also a row with the whole preset applied")
    p.add_argument("--n-calib", type=int, default=0,
                   help="calibration windows (0: none; calibration outliers / methods need them)")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--seqlen", type=int, default=None, help="perplexity window")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first windows")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mixq ablation ...``: prints one line per row; returns 0."""
    args = build_parser().parse_args(argv)
    rows, _ = run_ablation(args.model, args.preset, by=args.by, include_all=args.all,
                           n_calib=args.n_calib, calib_seqlen=args.calib_seqlen,
                           seqlen=args.seqlen, max_windows=args.max_windows, device=args.device,
                           dtype=torch_dtype(args.dtype), json_path=args.json,
                           progress=not args.quiet)
    for r in rows:
        print(f"{r['what']:12s} ppl {r['ppl']:10.3f}  delta {r['delta_vs_float']:+10.3f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
