"""The MNIST pipeline (``python -m mixq mnist``): train the course MLP, quantize it in every
mode and outlier fraction, evaluate, write the rows, the plot and the table.

``python -m mixq mnist [--json results/mnist.json] [--smoke] [--figure PATH] [--device cpu]``

The pieces (data, MLP, training, `quantize_mlp`, `evaluate`, `inject_outliers`) are
`mixq.mnist`; this module runs the matrix of configurations over them.
"""
from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mixq import data as _data
from mixq import nn as qnn
from mixq.config import QuantSpec
from mixq.experiments.common import add_common_flags, command_parser, environment, write_results
from mixq.mnist import (MLP, MNIST_W4_SPEC, calibration_stats, default_device, evaluate,
                        half_dtype, inject_outliers, load_mnist, quantize_mlp, train_mlp,
                        weight_nbytes)

__all__ = ["DEFAULT_FRACTIONS", "SMOKE_FRACTIONS", "DEFAULT_FIGURE", "SMOKE_FIGURE", "figures_dir",
           "run_pipeline", "format_table", "plot_accuracy_vs_outliers", "build_parser", "main"]

DEFAULT_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.10)
SMOKE_FRACTIONS = (0.01, 0.05)


def figures_dir() -> Path:
    """Where figures go: ``<repo>/figures`` in a source checkout (also an editable install),
    whatever the cwd (repo root or notebooks/); ``./figures`` for a plain pip install."""
    return _data.project_dir("figures")


DEFAULT_FIGURE = figures_dir() / "mnist_accuracy_vs_outliers.png"
#: A smoke run's figure (git-ignored: a smoke run never replaces the committed one).
SMOKE_FIGURE = figures_dir() / "mnist_accuracy_vs_outliers_smoke.png"


ROW_W4_SPEC = QuantSpec(4, True, "row")


def _label(mode: str, frac: float, spec: QuantSpec | None, injected: bool) -> str:
    name = mode.upper()
    if mode == "w4a4":
        name += f" +{frac * 100:g}% outliers" if frac > 0 else " RTN"
        if spec is not None and spec != MNIST_W4_SPEC:
            name += f" ({spec.describe()})"
    return ("[injected] " if injected else "") + name


def _configs(fractions, extra_specs, injected: bool) -> list[tuple[str, float, QuantSpec | None]]:
    half = "fp16" if half_dtype() == torch.float16 else "bf16"
    base = ["fp32", "w8a8", "w4a16", "w4a4"] if injected else ["fp32", half, "w8a8", "w4a16", "w4a4"]
    cfgs = [(m, 0.0, None) for m in base] + [("w4a4", f, None) for f in fractions]
    for spec in extra_specs:
        cfgs += [("w4a4", 0.0, spec)] + [("w4a4", f, spec) for f in fractions]
    return cfgs


def _backend(qmodel: nn.Module, device: torch.device) -> str:
    """"triton" if any W4A4 layer ran on the Triton kernels, else "torch"."""
    kernel = any(isinstance(m, qnn.W4A4Linear) and m.kernel_path for m in qmodel.modules())
    return "triton" if kernel and device.type == "cuda" else "torch"


def _eval_rows(model, configs, calib_x, test_x, test_y, *, injected, batch_size, progress):
    stats = calibration_stats(model, calib_x)
    ref = None
    rows = []
    desc = "quantize+eval" + (" (injected outliers)" if injected else "")
    for mode, frac, spec in tqdm(configs, desc=desc, disable=not progress):
        qmodel = quantize_mlp(model, mode, frac, calib_x, weight_spec=spec, stats=stats)
        res = evaluate(qmodel, test_x, test_y, batch_size=batch_size, ref_logits=ref)
        if mode == "fp32":
            ref = res["logits"]
            res.update(logit_sqnr_db=None, agreement=1.0)       # the reference itself
        spec = spec or {"w8a8": qnn.DEFAULT_W8_SPEC, "w4a16": MNIST_W4_SPEC,
                        "w4a4": MNIST_W4_SPEC}.get(mode)
        rows.append({
            "mode": mode.upper(), "label": _label(mode, frac, spec, injected),
            "model": "injected" if injected else "trained",
            "outlier_frac": float(frac),
            "n_outliers": [getattr(m, "n_outliers", 0) for m in qmodel.linears()],
            "weight_spec": spec.describe() if spec is not None else mode,
            "backend": _backend(qmodel, test_x.device),
            "accuracy": res["accuracy"], "weight_bytes": weight_nbytes(qmodel),
            "ms_per_batch": res["ms_per_batch"], "batch_size": batch_size,
            "logit_sqnr_db": (None if res["logit_sqnr_db"] is None or math.isinf(res["logit_sqnr_db"])
                              else res["logit_sqnr_db"]),      # inf (identical logits) -> None
            "agreement": res["agreement"],
        })
    return rows


def run_pipeline(*, smoke: bool | None = None, json_path: str | Path | None = None,
                 figure_path: str | Path | None = DEFAULT_FIGURE, epochs: int | None = None,
                 n_train: int | None = None, n_test: int | None = None,
                 fractions: tuple[float, ...] | None = None, n_calib: int = 1024,
                 extra_specs: tuple[QuantSpec, ...] | None = None, inject: bool = True,
                 inject_channels: int = 4, inject_scale: float = 32.0, seed: int = 0,
                 model: MLP | None = None, progress: bool = True,
                 root: str | Path | None = None,
                 device: str | torch.device | None = None) -> list[dict]:
    """Train, quantize in every mode, evaluate; optionally write JSON and the plot.

    Args:
        smoke: small and fast (6k train / 2k test, 2 epochs, fractions SMOKE_FRACTIONS, no
            extra weight specs); default `mixq.data.smoke_mode()`. The other arguments override.
        json_path: write the rows there (`mixq.experiments.common.write_results`; each row
            also carries the environment, smoke and seed) and the run description to
            ``<json_path stem>.meta.json`` (None: don't).
        figure_path: accuracy-vs-outlier-fraction PNG (None: no plot).
        epochs, n_train, n_test: training epochs and data subset sizes (None: all / default).
        fractions: W4A4 outlier fractions (RTN = 0 is always run).
        n_calib: training images used for calibration (outlier choice).
        extra_specs: further W4A4 weight specs, each run for RTN and every fraction
            (default: int4 per-row weights in full runs, none in smoke runs).
        inject: also evaluate a copy of the model with emulated outliers (`inject_outliers`
            with `inject_channels`, `inject_scale`): rows labelled "[injected] ...".
        seed: training and injection seed.
        model: an already trained FP32 `MLP` to quantize (skips training; `epochs` unused).
        root: MNIST folder (default: the data locator).
        device: where to train and evaluate (default `default_device()`: CUDA if present, where
            W4A4 layers with per-row weights run on the Triton kernels; "backend" says which).
    Returns:
        one dict per configuration: "mode" (FP32/FP16/W8A8/W4A16/W4A4), "label", "model"
        ("trained" | "injected"), "outlier_frac", "n_outliers" (per layer), "weight_spec",
        "accuracy" (0..1), "weight_bytes" (packed weights + scales + FP16 outlier weights +
        biases), "compression" (FP32 bytes / bytes), "ms_per_batch" (median, CPU, batch
        "batch_size"), "logit_sqnr_db" and "agreement" (vs the FP32 model of the same "model";
        sqnr None for that FP32 row itself),
        "delta_pp" (accuracy minus the trained FP32 accuracy, percentage points).
    """
    t_start = time.perf_counter()
    smoke = _data.smoke_mode() if smoke is None else bool(smoke)
    epochs = epochs if epochs is not None else (2 if smoke else 4)
    n_train = n_train if n_train is not None else (6000 if smoke else None)
    n_test = n_test if n_test is not None else (2000 if smoke else None)
    fractions = tuple(fractions) if fractions is not None else (
        SMOKE_FRACTIONS if smoke else DEFAULT_FRACTIONS)
    extra_specs = tuple(extra_specs) if extra_specs is not None else (
        () if smoke else (ROW_W4_SPEC,))
    train_x, train_y, test_x, test_y = load_mnist(root)
    train_x, train_y = train_x[:n_train], train_y[:n_train]
    test_x, test_y = test_x[:n_test], test_y[:n_test]
    device = torch.device(device) if device is not None else default_device()
    train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))

    t0 = time.perf_counter()
    trained_here = model is None
    if model is None:
        model = train_mlp(train_x, train_y, epochs=epochs, seed=seed, progress=progress)
    elif not isinstance(model, MLP):
        raise TypeError(f"model must be a mixq.mnist.MLP or None, got {type(model).__name__}")
    else:
        model = model.to(device)
    train_s = time.perf_counter() - t0
    calib_x = train_x[:n_calib]
    kw = dict(batch_size=256, progress=progress)
    rows = _eval_rows(model, _configs(fractions, extra_specs, False), calib_x, test_x, test_y,
                      injected=False, **kw)
    injected_channels = None
    if inject:
        inj, chans = inject_outliers(model, n_channels=inject_channels, scale=inject_scale,
                                     seed=seed)
        injected_channels = [c.tolist() for c in chans]
        rows += _eval_rows(inj, _configs(fractions, (), True), calib_x, test_x, test_y,
                           injected=True, **kw)
    fp32 = rows[0]
    for r in rows:
        r["compression"] = fp32["weight_bytes"] / r["weight_bytes"]
        r["delta_pp"] = (r["accuracy"] - fp32["accuracy"]) * 100
    env = environment(device)
    meta = {"smoke": smoke, "epochs": epochs if trained_here else None,
            "n_train": len(train_x), "n_test": len(test_x),
            "n_calib": len(calib_x), "seed": seed, "fractions": list(fractions),
            "inject": {"channels_per_layer": injected_channels, "scale": inject_scale}
            if inject else None,
            "train_seconds": train_s, "total_seconds": time.perf_counter() - t_start,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "fp16_compute": f"{half_dtype()} weights, activations and matmul ({device.type})",
            **env}
    if json_path is not None:
        write_results(json_path, [{**r, **env, "smoke": smoke, "seed": seed} for r in rows], meta)
    if figure_path is not None:
        plot_accuracy_vs_outliers(rows, figure_path)
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of `run_pipeline` rows (accuracy in %, delta vs the first row in pp)."""
    if not isinstance(rows, list) or not rows:
        raise ValueError("rows must be a non-empty list of run_pipeline rows")
    base = rows[0]
    lines = ["| mode | accuracy (%) | Δ vs FP32 (pp) | logit SQNR (dB) | weight bytes | "
             "compression | ms/batch | backend |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        sqnr = r.get("logit_sqnr_db")
        sqnr = "-" if sqnr is None or math.isinf(sqnr) else f"{sqnr:.1f}"
        lines.append(f"| {r.get('label', r['mode'])} | {r['accuracy'] * 100:.2f} | "
                     f"{(r['accuracy'] - base['accuracy']) * 100:+.2f} | "
                     f"{sqnr} | {r['weight_bytes']:,} | "
                     f"{base['weight_bytes'] / r['weight_bytes']:.2f}x | {r['ms_per_batch']:.2f} | "
                     f"{r.get('backend', 'torch')} |")
    return "\n".join(lines)


def plot_accuracy_vs_outliers(rows: list[dict], path: str | Path) -> Path:
    """Plot W4A4 against the outlier fraction and save a PNG to `path`.

    Drawn on a `matplotlib.figure.Figure` (no pyplot, no backend switch), so a notebook that
    calls this keeps its inline backend and its own ``plt.show()``.

    Panels: accuracy of the trained model (FP32 and W4A4-RTN as horizontal lines, one line per
    weight spec); accuracy of the injected-outlier model (if its rows are present); logit SQNR
    vs FP32 for every series. Parents of `path` are created. Returns the path.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w4 = [r for r in rows if r["mode"] == "W4A4"]
    models = list(dict.fromkeys(r.get("model", "trained") for r in rows))
    series = list(dict.fromkeys((r.get("model", "trained"), r["weight_spec"]) for r in w4))
    fig = Figure(figsize=(5.2 * (len(models) + 1), 4.3))
    axes = fig.subplots(1, len(models) + 1)
    ax_sq = axes[-1]
    for ax, model in zip(axes, models):
        fp32 = next(r for r in rows if r["mode"] == "FP32" and r.get("model", "trained") == model)
        ax.axhline(fp32["accuracy"] * 100, color="k", ls="--", label="FP32")
        ax.axhspan(fp32["accuracy"] * 100 - 0.3, fp32["accuracy"] * 100, color="k", alpha=0.07,
                   label="within 0.3 pp of FP32")
        ax.set_title("trained MLP" if model == "trained"
                     else "same MLP, injected activation outliers (x32)", fontsize=10)
        ax.set_ylabel("test accuracy (%)")
    for i, (model, spec) in enumerate(series):
        ax = axes[models.index(model)]
        pts = sorted((r["outlier_frac"], r["accuracy"] * 100,
                      math.nan if r.get("logit_sqnr_db") is None else r["logit_sqnr_db"])
                     for r in w4 if r.get("model", "trained") == model and r["weight_spec"] == spec)
        color = f"C{i}"
        tag = spec + (", injected" if model == "injected" else "")
        for f, acc, sq in pts:
            if f == 0:
                ax.axhline(acc, color=color, ls=":", label=f"W4A4 RTN ({spec})")
                ax_sq.axhline(sq, color=color, ls=":", lw=1)
        xs = [f * 100 for f, _, _ in pts if f > 0]
        ax.plot(xs, [a for f, a, _ in pts if f > 0], "o-", color=color,
                label=f"W4A4 + FP16 outliers ({spec})")
        ax_sq.plot(xs, [q for f, _, q in pts if f > 0], "o-", color=color, label=tag)
    ax_sq.set_title("distance to the FP32 logits (dotted: RTN)", fontsize=10)
    ax_sq.set_ylabel("logit SQNR vs FP32 (dB, higher is better)")
    ticks = sorted({r["outlier_frac"] * 100 for r in w4 if r["outlier_frac"] > 0})
    for ax in axes:
        ax.set_xscale("log")
        if ticks:
            ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("outlier channels in FP16 (% of each layer's inputs)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("MNIST 784-512-256-10 MLP: W4A4 with static FP16 outlier channels")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m mixq mnist``."""
    p = command_parser("mnist", "train, quantize and evaluate the MNIST MLP")
    add_common_flags(p, "json", "smoke", "device", "quiet")
    p.add_argument("--figure", metavar="PATH", default=None,
                   help=f"accuracy-vs-outliers plot (default {DEFAULT_FIGURE.name} in "
                        f"{DEFAULT_FIGURE.parent}; smoke runs: {SMOKE_FIGURE.name})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mixq mnist ...``: run the pipeline, print the table; returns 0."""
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    smoke = args.smoke or _data.smoke_mode()
    figure = args.figure or (SMOKE_FIGURE if smoke else DEFAULT_FIGURE)
    rows = run_pipeline(smoke=smoke, json_path=args.json, figure_path=figure,
                        device=args.device, progress=not args.quiet)
    print(format_table(rows))
    print(f"\nwall time: {time.perf_counter() - t0:.1f} s"
          + (f"; rows written to {args.json}" if args.json else "") + f"; figure {figure}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
