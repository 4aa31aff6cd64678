"""Quantize a causal LM and save it (``python -m mixq quantize``).

``python -m mixq quantize --model smollm2 --preset w4a4-o1+rotation+gptq --out DIR``
    calibrate on WikiText-2 valid, `mixq.quantize` with the preset's config, save model and
    tokenizer to DIR (`mixq.io.save_quantized`); ``--eval-windows N`` also scores WikiText-2
    test perplexity, ``--json PATH`` appends the result row to a results file.

What to quantize is a preset name (`mixq.presets`, ``python -m mixq sweep --list``; the
full-architecture suffixes ``+kv4``, ``+attn``, ``+norm`` included). Two additions compose
with it: ``--method`` appends PTQ methods after the preset's own, named by their module in
`mixq.methods` with optional parameters (``--method awq``, ``--method "smoothquant:alpha=0.5"``,
``--method "gptq:act_order=True"``); ``--skip`` leaves linears matching fnmatch patterns in
float (`QuantConfig.skip`). DIR must not hold a checkpoint already (``model.safetensors`` or
``quant_config.json``, e.g. ``--model DIR --out DIR`` of a float HF folder) unless
``--overwrite``: the check runs before the model is loaded.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

from mixq.experiments.common import (add_common_flags, append_results, command_parser,
                                     default_device, environment, torch_dtype)

__all__ = ["parse_method", "build_config", "existing_checkpoint", "build_parser", "main"]

_ALIASES = {"quarot": "rotation", "hadamard": "rotation", "smooth": "smoothquant",
            "mixedquant": "outlier_channels", "outliers": "outlier_channels"}


def _method_class(module):
    names = list(getattr(module, "__all__", [])) or sorted(vars(module))
    classes = [getattr(module, n) for n in names if isinstance(getattr(module, n, None), type)]
    methods = [c for c in classes if dataclasses.is_dataclass(c) and hasattr(c, "apply")]
    own = [c for c in methods if c.__module__ == module.__name__]
    if not (own or methods):
        raise ValueError(f"{module.__name__} defines no method dataclass with apply()")
    return (own or methods)[0]


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def parse_method(text: str):
    """``"name[:k=v,k=v]"`` -> a method config instance from ``mixq.methods.<name>``.

    The class is the module's dataclass with an ``apply`` method (first in ``__all__`` order);
    values are Python literals (``0.5``, ``True``, ``(64, 128)``) or plain strings.
    """
    name, _, params = text.partition(":")
    name = _ALIASES.get(name.strip().lower(), name.strip().lower())
    try:
        module = importlib.import_module(f"mixq.methods.{name}")
    except ImportError as e:
        raise ValueError(f"unknown method {name!r} (no module mixq.methods.{name}: {e})") from None
    cls = _method_class(module)
    kwargs = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method parameter {item!r} must be key=value")
        kwargs[key.strip()] = _literal(value.strip())
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad parameters for {cls.__name__}: {e}") from None


def build_config(preset_name: str, methods: Sequence[str] = (), skip: Sequence[str] = ()):
    """The `QuantConfig` of ``--preset`` with ``--method`` entries appended to its methods and
    ``--skip`` patterns to its skip list. Raises ValueError for an unknown preset or method."""
    from mixq.presets import preset

    config = preset(preset_name)
    return dataclasses.replace(config, methods=config.methods + tuple(map(parse_method, methods)),
                               skip=config.skip + tuple(skip))


def existing_checkpoint(directory: str | Path) -> list[str]:
    """The checkpoint files (`mixq.io.WEIGHTS_NAME`, `mixq.io.CONFIG_NAME`) already in
    `directory`, which ``--overwrite`` would replace."""
    from mixq.io import CONFIG_NAME, WEIGHTS_NAME

    return [n for n in (WEIGHTS_NAME, CONFIG_NAME) if (Path(directory) / n).exists()]


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m mixq quantize``."""
    p = command_parser("quantize", "calibrate, quantize and save a causal LM")
    add_common_flags(p, "model", "device", "dtype", "json", "quiet", model={"required": True},
                     dtype={"default": "fp16"},
                     json={"help": "append the result row to this results file"})
    p.add_argument("--preset", required=True,
                   help="what to quantize: a preset name (python -m mixq sweep --list), "
                        "e.g. w4a4-o1 or w4a4-o1+rotation+gptq+kv4+attn")
    p.add_argument("--method", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="a mixq.methods method appended after the preset's (repeatable)")
    p.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="fnmatch pattern of linears left in float (repeatable)")
    p.add_argument("--n-calib", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint already in --out")
    p.add_argument("--eval-windows", type=int, default=0,
                   help="also evaluate WikiText-2 test perplexity on this many windows (0: none)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mixq quantize ...``; returns the exit code."""
    from mixq.api import quantize
    from mixq.calibrate import calibration_batches
    from mixq.eval import perplexity, weight_bytes
    from mixq.io import load_model, save_quantized

    p = build_parser()
    args = p.parse_args(argv)
    try:
        config = build_config(args.preset, args.method, args.skip)
    except ValueError as e:
        p.error(str(e))
    found = existing_checkpoint(args.out)
    if found and not args.overwrite:
        p.error(f"{args.out} already holds a checkpoint ({', '.join(found)}); pass --overwrite "
                "to replace it")
    device = default_device(args.device)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=torch_dtype(args.dtype), device="cpu")
    max_pos = getattr(model.config, "max_position_embeddings", args.calib_seqlen)
    calib = calibration_batches(tok, n_samples=args.n_calib,
                                seqlen=min(args.calib_seqlen, max_pos))
    quantize(model, config, calib, device=device, progress=not args.quiet)   # layer by layer
    model.to(device)
    t_quant = time.perf_counter() - t0
    out = save_quantized(model, args.out, overwrite=args.overwrite)
    tok.save_pretrained(out)
    env = environment(device)
    row = {"command": "quantize", "model": args.model, "preset": args.preset, "out": str(out),
           "config": config.to_dict(), "quantize_s": round(t_quant, 2),
           "weight_bytes": weight_bytes(model), **env}
    if args.eval_windows:
        row.update(perplexity(model, tok, max_windows=args.eval_windows, device=device,
                              progress=not args.quiet))
    print(json.dumps({k: v for k, v in row.items() if k != "config"}, indent=1))
    if args.json:
        append_results(args.json, [row], env)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
