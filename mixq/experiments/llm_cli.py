"""Command functions for LLMs, wired into ``python -m mixq`` by mixq/__main__.py.

``python -m mixq quantize --model smollm2 --mode w4a4 --outlier-frac 0.01 --method awq --out DIR``
    calibrate on WikiText-2 valid, quantize, save (model + tokenizer) to DIR.
``python -m mixq eval --model DIR|smollm2|stories260k [--max-windows N] [--json results/x.json]``
    WikiText-2 test perplexity (+ weight bytes, optional tokens/s); prints and writes a JSON row.

Methods are named by their module in mixq.methods, optionally with parameters:
``--method awq``, ``--method "smoothquant:alpha=0.5"``, ``--method "gptq:act_order=True"``.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import platform
import time
from pathlib import Path

import torch

__all__ = ["quantize_main", "eval_main", "parse_method", "build_quantize_parser",
           "build_eval_parser"]

_ALIASES = {"quarot": "rotation", "hadamard": "rotation", "smooth": "smoothquant",
            "mixedquant": "outlier_channels", "outliers": "outlier_channels"}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    names = list(getattr(module, "__all__", [])) or sorted(vars(module))
    classes = [getattr(module, n) for n in names if isinstance(getattr(module, n, None), type)]
    classes = [c for c in classes if dataclasses.is_dataclass(c) and hasattr(c, "apply")
               and c.__module__ == module.__name__] or \
        [c for c in classes if dataclasses.is_dataclass(c) and hasattr(c, "apply")]
    if not classes:
        raise ValueError(f"mixq.methods.{name} defines no method dataclass with apply()")
    kwargs = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method parameter {item!r} must be key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    try:
        return classes[0](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad parameters for {classes[0].__name__}: {e}") from None


def _environment(device: str) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _write_json(path: str | None, row: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if p.is_file():
        old = json.loads(p.read_text())
        rows = old if isinstance(old, list) else [old]
    rows.append(row)
    p.write_text(json.dumps(rows, indent=1))


def _default_device(arg: str | None) -> str:
    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------- quantize
def build_quantize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixq quantize",
                                description="calibrate, quantize and save a causal LM")
    p.add_argument("--model", required=True, help="smollm2 | stories260k | HF id or path")
    p.add_argument("--mode", default="w4a4", choices=["w4a4", "w4a16", "w8a8", "fp16"])
    p.add_argument("--outlier-frac", type=float, default=0.0, help="FP16 channels per linear")
    p.add_argument("--outlier-strategy", default="calib_max",
                   choices=["calib_max", "max", "mean3std", "argmax"])
    p.add_argument("--method", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="a mixq.methods method (repeatable, applied in order)")
    p.add_argument("--w-bits", type=int, default=None, help="weight bits (default: mode's)")
    p.add_argument("--group-size", type=int, default=128,
                   help="weight group size; 0 = one scale per output channel")
    p.add_argument("--n-calib", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--skip", action="append", default=[], help="fnmatch pattern left in float")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if present)")
    p.add_argument("--dtype", default="fp16", choices=sorted(_DTYPES), help="float dtype")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--eval-windows", type=int, default=0,
                   help="also evaluate WikiText-2 test perplexity on this many windows (0: none)")
    p.add_argument("--json", default=None, help="append the result row to this JSON file")
    return p


def quantize_main(argv: list[str] | None = None) -> int:
    """``python -m mixq quantize ...``; returns the exit code."""
    from mixq.api import quantize
    from mixq.calibrate import calibration_batches
    from mixq.config import QuantConfig, QuantSpec
    from mixq.eval import perplexity, weight_bytes
    from mixq.io import save_quantized
    from mixq.llm import load_model

    args = build_quantize_parser().parse_args(argv)
    device = _default_device(args.device)
    methods = tuple(parse_method(m) for m in args.method)
    w = "auto"
    if args.mode in ("w4a4", "w4a16"):
        bits = args.w_bits or 4
        w = (QuantSpec(bits, True, "row") if args.group_size == 0
             else QuantSpec(bits, True, "group", args.group_size))
    config = QuantConfig(w=w, mode=args.mode, outlier_frac=args.outlier_frac,
                         outlier_strategy=args.outlier_strategy, methods=methods,
                         skip=tuple(args.skip))
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=_DTYPES[args.dtype], device="cpu")
    max_pos = getattr(model.config, "max_position_embeddings", args.calib_seqlen)
    seqlen = min(args.calib_seqlen, max_pos)
    calib = calibration_batches(tok, n_samples=args.n_calib, seqlen=seqlen)
    quantize(model, config, calib, device=device)   # one layer at a time on `device`
    model.to(device)
    t_quant = time.perf_counter() - t0
    out = save_quantized(model, args.out)
    tok.save_pretrained(out)
    row = {"command": "quantize", "model": args.model, "out": str(out),
           "config": config.to_dict(), "quantize_s": round(t_quant, 2),
           "weight_bytes": weight_bytes(model), **_environment(device)}
    if args.eval_windows:
        row.update(perplexity(model, tok, max_windows=args.eval_windows, device=device))
    print(json.dumps({k: v for k, v in row.items() if k != "config"}, indent=1))
    _write_json(args.json, row)
    return 0


# ------------------------------------------------------------------------------- eval
def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixq eval",
                                description="WikiText-2 perplexity (and speed) of a model")
    p.add_argument("--model", required=True,
                   help="a save_quantized directory | smollm2 | stories260k | HF id or path")
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--seqlen", type=int, default=None, help="window (default min(2048, max pos))")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES),
                   help="float dtype of an unquantized model")
    p.add_argument("--speed", action="store_true", help="also measure prefill/decode tokens/s")
    p.add_argument("--json", default=None, help="append the result row to this JSON file")
    return p


def eval_main(argv: list[str] | None = None) -> int:
    """``python -m mixq eval ...``; returns the exit code."""
    from mixq.eval import perplexity, tokens_per_second, weight_bytes
    from mixq.llm import load_model

    args = build_eval_parser().parse_args(argv)
    device = _default_device(args.device)
    model, tok = load_model(args.model, dtype=_DTYPES[args.dtype], device=device)
    if tok is None:
        raise SystemExit(f"{args.model} has no tokenizer files; save one beside the weights")
    t0 = time.perf_counter()
    row = {"command": "eval", "model": args.model, "split": args.split,
           "mode": getattr(getattr(model, "mixq_config", None), "mode", "float:" + args.dtype)}
    row.update(perplexity(model, tok, split=args.split, seqlen=args.seqlen,
                          max_windows=args.max_windows, max_tokens=args.max_tokens,
                          batch_size=args.batch_size, device=device))
    row["eval_s"] = round(time.perf_counter() - t0, 2)
    row["weight_bytes"] = weight_bytes(model)
    if args.speed:
        row.update(tokens_per_second(model, device=device))
    row.update(_environment(device))
    print(json.dumps(row, indent=1))
    _write_json(args.json, row)
    return 0
