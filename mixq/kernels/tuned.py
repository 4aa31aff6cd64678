"""Tuned launch configs, cached per GPU in a JSON file that ships with mixq (gemlite-style).

Why: `triton.autotune` benchmarks every config the first time a key is seen (seconds per layer
shape on a fresh machine) and, after that, still runs its Python lookup on every call. The
GEMM launchers (`mixq.kernels.w4a4`, `mixq.kernels.w4a16`) instead ask `lookup` first: a
dict hit gives the config and the kernel is launched with it directly; only a miss runs the
autotuner, whose winner is then kept (`remember`) for the rest of the process.

Files: ``mixq/kernels/configs/<gpu>.json`` (``<gpu>`` = `gpu_slug`, e.g. ``h100``), written by
``python -m mixq tune`` on that GPU::

    {"format": "mixq-tuned-configs", "device_name": "NVIDIA H100 80GB HBM3", "triton": "3.6.0",
     "kernels": {"w4a4": {"<key>": {"kwargs": {"BM": 16, ...}, "num_warps": 4,
                                    "num_stages": 4}, ...}, "w4a16": {...}}}

``<key>`` is the launcher's tuning key (M bucket, N, K, flags and dtypes) joined by commas. A
file for another GPU, a missing file, or ``MIXQ_TUNED_CONFIGS=0`` means plain autotuning; a
malformed file is an error naming the file (a shipped file is never silently ignored).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

__all__ = ["CONFIG_DIR", "FORMAT", "gpu_slug", "config_path", "lookup", "remember", "export",
           "key_string", "clear", "launch", "run_config"]

CONFIG_DIR = Path(__file__).with_name("configs")
FORMAT = "mixq-tuned-configs"
_FIELDS = ("num_warps", "num_stages")

#: device -> {kernel: {key string: triton.Config}}; filled from the file on first use, then
#: by `remember`.
_TABLES: dict = {}


def gpu_slug(device_name: str) -> str:
    """Short lower-case GPU name for file names: "NVIDIA H100 80GB HBM3" -> "h100",
    "NVIDIA A100-SXM4-40GB" -> "a100", else the name with non-alphanumerics as "_"."""
    name = device_name.lower()
    m = re.search(r"\b([a-z]{1,2}\d{1,4}[a-z]?)\b", name.replace("-", " "))
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def config_path(device: torch.device) -> Path:
    """The shipped config file for `device`'s GPU."""
    return CONFIG_DIR / f"{gpu_slug(torch.cuda.get_device_name(device))}.json"


def key_string(key: tuple) -> str:
    """The JSON key of a tuning key: its items as text (dtypes without "torch.")."""
    return ",".join(str(v).removeprefix("torch.") for v in key)


def _to_config(entry: dict, where: str):
    import triton

    try:
        return triton.Config(dict(entry["kwargs"]), num_warps=int(entry["num_warps"]),
                             num_stages=int(entry["num_stages"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: malformed config entry {entry!r}: {e}") from None


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the tuned configs: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or \
            not isinstance(data.get("kernels"), dict):
        raise ValueError(f"{path}: not a {FORMAT} file (needs 'format' and 'kernels')")
    return {kernel: {k: _to_config(v, f"{path} [{kernel}][{k}]") for k, v in table.items()}
            for kernel, table in data["kernels"].items()}


def _table(device: torch.device) -> dict:
    table = _TABLES.get(device)
    if table is None:
        table = {}
        if device.type == "cuda" and os.environ.get("MIXQ_TUNED_CONFIGS", "1").strip() != "0":
            path = config_path(device)
            if path.is_file():
                table = _load(path)
        _TABLES[device] = table
    return table


#: (kernel, key tuple, device) -> config: the per-call fast path (one dict hit, no formatting)
_HITS: dict = {}


def lookup(kernel: str, key: tuple, device: torch.device):
    """The config for `kernel` at tuning `key` on `device` (shipped or remembered), else None."""
    hit = _HITS.get((kernel, key, device))
    if hit is None:
        hit = _table(device).get(kernel, {}).get(key_string(key))
        if hit is not None:
            _HITS[(kernel, key, device)] = hit
    return hit


def remember(kernel: str, key: tuple, config, device: torch.device) -> None:
    """Keep the autotuner's winner for the rest of the process (and for `export`)."""
    if config is not None:
        _table(device).setdefault(kernel, {})[key_string(key)] = config
        _HITS[(kernel, key, device)] = config


def run_config(fn, grid, args: tuple, meta: dict, config) -> None:
    """Launch the jitted kernel `fn` with `config` (a triton.Config) on top of `meta`; `grid`
    is the launcher's ``grid(meta) -> tuple``."""
    full = {**meta, **config.kwargs}
    fn[grid(full)](*args, **full, num_warps=config.num_warps, num_stages=config.num_stages)


def launch(kernel: str, key: tuple, tuner, fn, grid, args: tuple, meta: dict,
           device: torch.device) -> None:
    """The launchers' one dispatch: the config known for (`kernel`, `key`) on `device` runs
    `fn` directly (`run_config`); an unseen key runs the autotuner `tuner` (wrapping `fn`)
    once and keeps its winner (`remember`)."""
    config = lookup(kernel, key, device)
    if config is None:
        tuner[grid](*args, **meta)
        remember(kernel, key, getattr(tuner, "best_config", None), device)
    else:
        run_config(fn, grid, args, meta, config)


def clear() -> None:
    """Forget every table (tests; the next lookup reloads the file)."""
    _TABLES.clear()
    _HITS.clear()


def export(path: str | os.PathLike, device: torch.device) -> dict:
    """Write every config known for `device` (shipped + tuned in this process) to `path` as a
    `FORMAT` file; returns the written dict. Keys of an existing file at `path` are kept
    unless this process tuned them again."""
    import triton

    path = Path(path)
    old = _load(path) if path.is_file() else {}
    merged = {kernel: dict(table) for kernel, table in old.items()}
    for kernel, table in _table(device).items():
        merged.setdefault(kernel, {}).update(table)
    data = {"format": FORMAT, "device_name": torch.cuda.get_device_name(device),
            "triton": triton.__version__, "torch": torch.__version__,
            "kernels": {kernel: {k: {"kwargs": dict(c.kwargs),
                                     **{f: getattr(c, f) for f in _FIELDS}}
                                 for k, c in sorted(table.items())}
                        for kernel, table in sorted(merged.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return data
