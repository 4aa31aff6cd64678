"""Score a model (``python -m mixq eval``): WikiText-2 perplexity, weight bytes and, with
``--speed``, prefill / decode tokens/s.

``python -m mixq eval --model DIR|smollm2|stories260k [--max-windows N] [--json results/x.json]``

The model is anything `mixq.io.load_model` takes: a checkpoint written by ``python -m mixq
quantize`` (its config, full-architecture parts included, comes back with it; with a KV cache
in it, every window reads K/V through that cache, `mixq.experiments.common.kv_cache_factory`)
or a float model.
The result row is printed and, with ``--json``, appended to a results file.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

from mixq.experiments.common import (add_common_flags, append_results, command_parser,
                                     default_device, environment, kv_cache_factory, torch_dtype)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m mixq eval``."""
    p = command_parser("eval", "WikiText-2 perplexity (and speed) of a model")
    add_common_flags(p, "model", "device", "dtype", "json", "quiet", model={"required": True},
                     dtype={"default": "fp32", "help": "float dtype of an unquantized model"},
                     json={"help": "append the result row to this results file"})
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--seqlen", type=int, default=None, help="window (default min(2048, max pos))")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first windows")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first tokens")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward call")
    p.add_argument("--speed", action="store_true", help="also measure prefill/decode tokens/s")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mixq eval ...``; returns the exit code."""
    from mixq.eval import perplexity, tokens_per_second, weight_bytes
    from mixq.io import load_model

    p = build_parser()
    args = p.parse_args(argv)
    device = default_device(args.device)
    model, tok = load_model(args.model, dtype=torch_dtype(args.dtype), device=device)
    if tok is None:
        p.error(f"{args.model} has no tokenizer files; save one beside the weights")
    t0 = time.perf_counter()
    config = getattr(model, "mixq_config", None)
    row = {"command": "eval", "model": args.model, "split": args.split,
           "mode": config.mode if config is not None else f"float:{args.dtype}"}
    row.update(perplexity(model, tok, split=args.split, seqlen=args.seqlen,
                          max_windows=args.max_windows, max_tokens=args.max_tokens,
                          batch_size=args.batch_size, device=device, progress=not args.quiet,
                          cache_factory=kv_cache_factory(model)))
    row["eval_s"] = round(time.perf_counter() - t0, 2)
    row["weight_bytes"] = weight_bytes(model)
    if args.speed:
        row.update(tokens_per_second(model, device=device))
    env = environment(device)
    row.update(env)
    print(json.dumps(row, indent=1))
    if args.json:
        append_results(args.json, [row], env)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
