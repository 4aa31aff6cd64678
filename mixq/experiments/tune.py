"""Tune the GEMM kernels for a model's layer shapes and write the per-GPU config file
(``python -m mixq tune``; CUDA).

``python -m mixq tune [--models llama3-8b] [--modes w4a16-g128,w4a4-rtn,w4a4-o1-salient]
[--m 1,2,4,8,16,32,64,128,256,512,1024,2048,4096] [--out PATH]``

For every model (`mixq.experiments.bench_e2e.build_model`, one decoder layer: every layer has
the same shapes) and preset it quantizes a fresh copy and runs forwards over (1, M) token ids for
every M, so each quantized linear's kernels autotune once per M bucket; then it writes every
winner with `mixq.kernels.tuned.export` to ``mixq/kernels/configs/<gpu>.json`` (default), the
file the launchers read first, so a fresh process on that GPU launches tuned configs without
benchmarking and without the autotuner's per-call lookup. Existing keys of the file are kept
unless tuned again.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from mixq.experiments.common import add_common_flags, comma_list, command_parser, int_list

__all__ = ["DEFAULT_MODES", "DEFAULT_M", "build_parser", "tune", "main"]

DEFAULT_MODES = ("w4a16-g128", "w4a4-rtn", "w4a4-o1-salient")
DEFAULT_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("tune", "tune the GEMM kernels for a model's shapes; write the GPU's "
                               "config file (CUDA)")
    p.add_argument("--models", default="llama3-8b", help="comma list of bench e2e models")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help="presets to tune")
    p.add_argument("--m", default=",".join(map(str, DEFAULT_M)), help="token counts")
    p.add_argument("--out", default=None, help="config file (default: the shipped one)")
    add_common_flags(p, "quiet")
    return p


@torch.no_grad()
def tune(models: Sequence[str], modes: Sequence[str], ms: Sequence[int],
         progress: bool = True, after_mode=None) -> int:
    """Run every (model, mode, M) once on the GPU; returns the number of forwards.
    `after_mode()` (optional) runs after each mode, e.g. to write what was tuned so far."""
    from tqdm.auto import tqdm

    from mixq.api import quantize
    from mixq.experiments import bench_e2e

    runs = 0
    for name in models:
        for mode in tqdm(list(modes), desc=name, disable=not progress):
            model, _ = bench_e2e.build_model(name, layers=1, device="cuda", dtype=torch.bfloat16)
            quantize(model, bench_e2e.quant_config(mode), None, progress=False)
            for m in ms:
                ids = torch.randint(0, model.config.vocab_size, (1, m), device="cuda")
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                runs += 1
            del model
            torch.cuda.empty_cache()
            if after_mode is not None:
                after_mode()
    torch.cuda.synchronize()
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mixq tune ...``; returns the exit code (2 without a CUDA GPU)."""
    from mixq.kernels import tuned

    args = build_parser().parse_args(None if argv is None else list(argv))
    if not torch.cuda.is_available():
        print("python -m mixq tune needs a CUDA GPU")
        return 2
    ms = int_list(args.m, "--m")
    device = torch.device("cuda", torch.cuda.current_device())
    path = args.out or tuned.config_path(device)
    # written after every mode: a run cut short (a time limit) keeps what it tuned
    runs = tune(comma_list(args.models), comma_list(args.modes), ms, progress=not args.quiet,
                after_mode=lambda: tuned.export(path, device))
    data = tuned.export(path, device)
    counts = {k: len(v) for k, v in data["kernels"].items()}
    print(f"{runs} forwards; wrote {path}: {counts} configs for {data['device_name']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
