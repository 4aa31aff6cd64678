"""Command line: ``python -m mixq <command> [flags]`` (``python -m mixq <command> --help``).

Every command is one module of `mixq.experiments` with ``build_parser()`` and
``main(argv) -> int``; `COMMANDS` maps the command words to it and this file only looks the
words up, imports the module (lazily: the commands pull in torch, transformers, matplotlib)
and hands it the remaining flags.
"""
from __future__ import annotations

import importlib
import sys

#: command words -> (module of mixq.experiments, one-line description), in --help order.
COMMANDS: dict[str, tuple[str, str]] = {
    "mnist": ("mnist", "train, quantize and evaluate the MNIST MLP (the course's table)"),
    "bench gemm": ("bench_gemm", "GEMM kernels vs cuBLAS bf16 / fp8 / int_mm / tinygemm (CUDA)"),
    "bench e2e": ("bench_e2e", "end-to-end tokens/s and memory: HF bf16 vs mixq presets"),
    "bench attention": ("bench_attention", "attention prefill / decode vs SDPA, one layer"),
    "tune": ("tune", "tune the GEMM kernels for a model's shapes, write the GPU's config file"),
    "report": ("report", "figures and README results tables from results/*.json"),
    "quantize": ("quantize", "quantize a causal LM with a preset and save it"),
    "eval": ("evaluate", "WikiText-2 perplexity (and speed) of a model or checkpoint"),
    "sweep": ("sweep", "perplexity of a causal LM under every preset (results/llm_*.json)"),
    "full": ("full", "perplexity after each full-architecture W4A4 step (+kv4, +attn, +norm)"),
    "ablation": ("ablation", "perplexity with one linear kind or block quantized at a time"),
}


def usage() -> str:
    """The text of ``python -m mixq --help``: every command with its line."""
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m mixq <command> [flags]   (python -m mixq <command> --help)", "",
             "mixq: W4A4 quantization with FP16 outlier channels. Commands:"]
    lines += [f"  {words:{width}s}  {text}" for words, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def _lookup(argv: list[str]) -> tuple[str, list[str]] | None:
    """``(command words, remaining flags)`` of the longest command `argv` starts with."""
    for n in (2, 1):
        words = " ".join(argv[:n])
        if len(argv) >= n and words in COMMANDS:
            return words, argv[n:]
    return None


def command_module(words: str):
    """The `mixq.experiments` module of a command (imported now)."""
    return importlib.import_module(f"mixq.experiments.{COMMANDS[words][0]}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for an unknown command)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    found = _lookup(argv)
    if found is None:
        print(f"python -m mixq: unknown command {' '.join(argv[:2])!r}\n\n{usage()}",
              file=sys.stderr)
        return 2
    words, rest = found
    return int(command_module(words).main(rest))


if __name__ == "__main__":
    sys.exit(main())
