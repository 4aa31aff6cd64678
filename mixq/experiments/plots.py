"""Figures from result rows: GEMM speedup vs M, per-channel activation maxima, perplexity.

The GEMM benchmark (`mixq.experiments.bench_gemm`, ``python -m mixq bench gemm --json PATH``)
writes one row per (shape, M, mode)::

    {"shape": "8b.gate_up", "N": 28672, "K": 4096, "M": 2048, "mode": "mixq_w4a4",
     "time_ms": 0.385, "speedup_vs_bf16": 1.6, "rel_err_vs_bf16": 0.09, "device_name": ...}

where ``speedup_vs_bf16 = time_ms(bf16, same shape and M) / time_ms(mode)`` and ``time_ms`` is
None for a mode that could not run on that machine. `load_gemm_results` reads such a file
(`mixq.experiments.common.read_results`) and `gemm_speedup_plot` draws one panel per shape:
speedup over bf16 against M (log scale), one line per mode, bf16 itself as the dashed line at 1.

For the LLM notebook: `channel_absmax_plot` (per-channel max |x| of linear inputs: activation
outliers) and `perplexity_plot` (WikiText-2 perplexity by method and by FP16 outlier fraction).

Plots are drawn on a `matplotlib.figure.Figure` (no pyplot, no global backend switch), so they
work headless (Agg) and inside notebooks alike; `save_figure` writes one as a PNG.
"""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from pathlib import Path

from mixq.data import project_dir  # re-exported: notebooks call plots.project_dir
from mixq.experiments.common import read_results

__all__ = ["GEMM_PLOT_MODES", "REQUIRED_ROW_KEYS", "project_dir", "load_gemm_results",
           "save_figure", "gemm_speedup_plot", "channel_absmax_plot", "perplexity_plot"]

GEMM_PLOT_MODES = ("bf16", "fp8_scaled_mm", "int8_int_mm", "tinygemm_w4a16", "mixq_w4a16",
                   "mixq_w4a4", "mixq_w4a4_outliers", "mixq_w4a4+quant")
"""Modes drawn by default, in legend order (``mixq_quant``, the act-quant kernel alone, is not a
GEMM, so its "speedup" is left out)."""

REQUIRED_ROW_KEYS = ("shape", "N", "K", "M", "mode", "time_ms")

_LABELS = {
    "bf16": "bf16 cuBLAS (baseline)",
    "fp8_scaled_mm": "fp8 _scaled_mm",
    "int8_int_mm": "int8 _int_mm",
    "tinygemm_w4a16": "tinygemm W4A16",
    "mixq_w4a16": "mixq W4A16",
    "mixq_w4a4": "mixq W4A4",
    "mixq_w4a4_outliers": "mixq W4A4 + outliers",
    "mixq_w4a4+quant": "mixq W4A4 + outliers + act-quant",
}


# seaborn "colorblind" palette indices: peers in orange / green / grey, mixq in purple / blue / red
_COLOR_INDEX = {"fp8_scaled_mm": 1, "int8_int_mm": 2, "tinygemm_w4a16": 7, "mixq_w4a16": 4,
                "mixq_w4a4": 0, "mixq_w4a4_outliers": 3, "mixq_w4a4+quant": 5}


def _check_rows(rows, where: str) -> list[dict]:
    if not isinstance(rows, (list, tuple)):
        raise TypeError(f"{where}: rows must be a list of dicts, got {type(rows).__name__}")
    if not rows:
        raise ValueError(f"{where}: no rows")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise TypeError(f"{where}: row {i} must be a dict, got {type(r).__name__}")
        missing = [k for k in REQUIRED_ROW_KEYS if k not in r]
        if missing:
            raise ValueError(f"{where}: row {i} ({r.get('shape')!r}, M={r.get('M')!r}, "
                             f"mode={r.get('mode')!r}) lacks keys {missing}")
    return list(rows)


def _with_speedups(rows: list[dict]) -> list[dict]:
    """Copies of `rows`; ``speedup_vs_bf16`` recomputed (`bench_gemm.add_speedups`) when a
    timed row lacks it (or has None, as `bench_gemm.make_row` leaves it), ``rel_err_vs_bf16``
    defaulted to None."""
    rows = copy.deepcopy(rows)
    for r in rows:
        r.setdefault("rel_err_vs_bf16", None)
    if any(r["time_ms"] is not None and r.get("speedup_vs_bf16") is None for r in rows):
        from mixq.experiments.bench_gemm import add_speedups
        add_speedups(rows)
    return rows


def load_gemm_results(path: str | os.PathLike) -> tuple[list[dict], dict]:
    """Read GEMM benchmark rows written by ``python -m mixq bench gemm --json PATH``.

    Args:
        path: a results file (`mixq.experiments.common.read_results`: a list of rows with
            ``<stem>.meta.json`` beside it, or the older ``{"meta": ..., "rows": [...]}``).
            Every row needs the keys `REQUIRED_ROW_KEYS` (shape str, N int, K int, M int, mode
            str, time_ms float or None).
    Returns:
        ``(rows, meta)``: rows as a list of dicts, each with ``speedup_vs_bf16`` (computed from
        the bf16 row of the same shape and M when the file lacks it; None without a timing)
        and ``rel_err_vs_bf16`` (None when absent); meta as `read_results` gives it.
    Raises:
        FileNotFoundError: no such file. ValueError: not JSON, no rows, or a row lacking a key.
        TypeError: the JSON is neither a dict with "rows" nor a list of dicts.
    """
    rows, meta = read_results(path)
    return _with_speedups(_check_rows(rows, str(path))), meta


def save_figure(fig, path: str | os.PathLike | None) -> None:
    """Write `fig` as a PNG to `path` (parent folders created); None writes nothing."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)


def gemm_speedup_plot(rows: Sequence[dict], path: str | os.PathLike | None = None, *,
                      modes: Sequence[str] | None = None, title: str | None = None,
                      ncols: int | None = None):
    """Speedup over bf16 vs token count M, one panel per shape, one line per mode.

    Points are ``(M, speedup_vs_bf16)`` of every row with a timing; modes that never ran
    (``time_ms`` None everywhere, e.g. fp8 on a GPU without it) are left out of the legend.
    bf16 is drawn as the dashed reference line at 1.

    Args:
        rows: benchmark rows (see the module docstring / `load_gemm_results`); rows without
            ``speedup_vs_bf16`` get it computed from the bf16 row of their shape and M.
        path: where to save the figure (PNG, dpi 120; parent folders are created); None: not
            saved.
        modes: modes to draw, in legend order; default `GEMM_PLOT_MODES` (those present).
        title: figure title; default ``"GEMM speedup over bf16 on <device>"`` (the rows'
            ``device_name``, or ``gpu`` in the older files).
        ncols: panels per row; default ``ceil(sqrt(number of shapes))``.
    Returns:
        the `matplotlib.figure.Figure` (not attached to pyplot; display it or close it).
    Raises:
        TypeError / ValueError: bad rows (see `load_gemm_results`), no timed row to draw,
            ncols < 1.
    """
    from matplotlib.figure import Figure
    import seaborn as sns

    rows = _with_speedups(_check_rows(list(rows), "gemm_speedup_plot"))
    if ncols is not None and (isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1):
        raise ValueError(f"ncols must be a positive int or None, got {ncols!r}")
    modes = list(GEMM_PLOT_MODES if modes is None else modes)
    timed = [r for r in rows if r["mode"] in modes and r["time_ms"] is not None
             and r.get("speedup_vs_bf16") is not None]
    if not timed:
        raise ValueError(f"gemm_speedup_plot: no row with a timing for modes {modes}")
    shapes = list(dict.fromkeys(r["shape"] for r in timed))
    present = [m for m in modes if any(r["mode"] == m for r in timed)]
    colors = sns.color_palette("colorblind", 10)
    palette = {mode: colors[i] for mode, i in _COLOR_INDEX.items()}
    extra = [m for m in present if m not in palette]
    palette.update(zip(extra, sns.color_palette("husl", max(len(extra), 1))))

    ncols = min(ncols or math.ceil(math.sqrt(len(shapes))), len(shapes))
    nrows = -(-len(shapes) // ncols)
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(max(4.6 * ncols, 9.2), 3.6 * nrows + 0.9), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(shapes):]:
        ax.set_visible(False)
    for ax, shape in zip(axes.flat, shapes):
        sr = [r for r in timed if r["shape"] == shape]
        ms = sorted({r["M"] for r in sr})
        for mode in present:
            pts = sorted((r["M"], r["speedup_vs_bf16"]) for r in sr if r["mode"] == mode)
            if not pts:
                continue
            x, y = zip(*pts)
            if mode == "bf16":
                ax.plot(x, y, ls="--", lw=1.2, color="black", label=_LABELS[mode], gid=mode)
            else:
                mixq = mode.startswith("mixq")
                ax.plot(x, y, marker="o" if mixq else "s", ms=4, lw=2.0 if mixq else 1.1,
                        ls="-" if mixq else ":", color=palette[mode],
                        label=_LABELS.get(mode, mode), gid=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_xlabel("tokens M")
        ax.set_ylabel("speedup over bf16")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{shape}  (N={sr[0]['N']}, K={sr[0]['K']})", fontsize=10)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat[1:len(shapes)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)),
               fontsize=9, frameon=False)
    device = next((r.get(k) for r in rows for k in ("device_name", "gpu") if r.get(k)), None)
    fig.suptitle(title or "GEMM speedup over bf16" + (f" on {device}" if device else ""))
    save_figure(fig, path)
    return fig


# ------------------------------------------------------------------------------- LLM notebook plots
def channel_absmax_plot(absmax, path: str | os.PathLike | None = None, *,
                        ncols: int | None = None, title: str | None = None, log: bool = True):
    """Per-channel max |x| of some linears' inputs, one panel per input (activation outliers).

    Args:
        absmax: mapping ``{label: 1-D values}`` (torch tensor, numpy array or sequence; e.g.
            ``LinearStats.absmax`` from `mixq.calibrate`), in panel order.
        path: where to save the figure (PNG, dpi 120; parent folders created); None: not saved.
        ncols: panels per row; default ``min(4, number of panels)``.
        title: figure title; default "Per-channel max |x| at linear inputs".
        log: log-scale y axis.
    Returns:
        the `matplotlib.figure.Figure`. Each panel draws the values against the channel index
        (line gid "absmax") and the median as a dashed line (gid "median"); its title gives
        ``max / median``.
    Raises:
        ValueError: no panels, an empty or non-1-D series, ncols < 1.
    """
    import numpy as np
    from matplotlib.figure import Figure
    import seaborn as sns

    if not hasattr(absmax, "items") or not absmax:
        raise ValueError("channel_absmax_plot: absmax must be a non-empty mapping {label: values}")
    if ncols is not None and (isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1):
        raise ValueError(f"ncols must be a positive int or None, got {ncols!r}")
    series = {}
    for label, v in absmax.items():
        arr = np.asarray(v.detach().float().cpu() if hasattr(v, "detach") else v, dtype=float)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"channel_absmax_plot: {label!r} must be a non-empty 1-D series, "
                             f"got shape {arr.shape}")
        series[str(label)] = np.abs(arr)
    ncols = min(ncols or 4, len(series))
    nrows = -(-len(series) // ncols)
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(3.6 * ncols + 0.4, 2.8 * nrows + 0.7), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(series):]:
        ax.set_visible(False)
    color = sns.color_palette("colorblind", 4)
    for ax, (label, arr) in zip(axes.flat, series.items()):
        med = float(np.median(arr))
        ax.plot(np.arange(arr.size), arr, lw=0.8, color=color[0], gid="absmax")
        ax.axhline(med, ls="--", lw=1.0, color=color[3], gid="median")
        ratio = arr.max() / med if med > 0 else float("inf")
        ax.set_title(f"{label}\nmax/median = {ratio:.1f}", fontsize=9)
        if log and (arr > 0).any():
            ax.set_yscale("log")
        ax.set_xlabel("input channel")
        ax.set_ylabel("max |x|")
    fig.suptitle(title or "Per-channel max |x| at linear inputs")
    save_figure(fig, path)
    return fig


def perplexity_plot(rows: Sequence[dict], path: str | os.PathLike | None = None, *,
                    baseline: str | None = None, title: str | None = None):
    """Perplexity by method (bars) and against the FP16 outlier fraction (line).

    Args:
        rows: dicts with ``"name"`` (str) and ``"ppl"`` (float), optionally ``"outlier_frac"``
            (float or None): the rows that have it form the line of the right panel (W4A4 RTN
            as fraction 0 and the "+ outliers" rows); without any such row only the bar panel
            is drawn.
        path: where to save the figure (PNG, dpi 120; parent folders created); None: not saved.
        baseline: name of the reference row (e.g. "FP16"), drawn as a dashed line in both
            panels (gid "baseline"); None: none.
        title: figure title; default "WikiText-2 perplexity".
    Returns:
        the `matplotlib.figure.Figure`: axes[0] holds one bar per row, in order (horizontal,
        log scale); axes[1] (if any) the line (gid "outliers") of ppl against the fraction in %.
    Raises:
        TypeError / ValueError: rows not a non-empty list of dicts with name and a finite
            positive ppl; unknown baseline.
    """
    from matplotlib.figure import Figure
    import seaborn as sns

    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError("perplexity_plot: rows must be a non-empty list of dicts")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise TypeError(f"perplexity_plot: row {i} must be a dict, got {type(r).__name__}")
        if "name" not in r or "ppl" not in r:
            raise ValueError(f"perplexity_plot: row {i} needs 'name' and 'ppl', got {sorted(r)}")
        if not isinstance(r["ppl"], (int, float)) or not math.isfinite(r["ppl"]) or r["ppl"] <= 0:
            raise ValueError(f"perplexity_plot: row {i} ({r['name']!r}) has ppl {r['ppl']!r}; "
                             "needs a finite positive number")
    names = [str(r["name"]) for r in rows]
    ref = None
    if baseline is not None:
        if baseline not in names:
            raise ValueError(f"perplexity_plot: baseline {baseline!r} is not a row name {names}")
        ref = float(rows[names.index(baseline)]["ppl"])
    sweep = sorted((float(r["outlier_frac"]), float(r["ppl"])) for r in rows
                   if r.get("outlier_frac") is not None)
    colors = sns.color_palette("colorblind", 10)
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(11 if sweep else 6.5, 0.32 * len(rows) + 2.2), layout="constrained")
        axes = fig.subplots(1, 2 if sweep else 1, squeeze=False,
                            width_ratios=[1.4, 1] if sweep else None)[0]
    ax = axes[0]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [float(r["ppl"]) for r in rows], color=[colors[i % 10] for i in range(len(rows))],
            gid="bars")
    ax.set_yticks(y, names)
    ax.set_xscale("log")
    ax.set_xlabel("perplexity (log scale, lower is better)")
    for yi, r in zip(y, rows):
        ax.text(float(r["ppl"]), yi, f" {float(r['ppl']):.2f}", va="center", fontsize=8)
    if ref is not None:
        ax.axvline(ref, ls="--", lw=1.0, color="black", gid="baseline")
    ax.set_title("by method", fontsize=10)
    if sweep:
        ax = axes[1]
        x, p = zip(*sweep)
        ax.plot([100 * v for v in x], p, marker="o", lw=2, color=colors[3], gid="outliers",
                label="W4A4 + FP16 outliers")
        if ref is not None:
            ax.axhline(ref, ls="--", lw=1.0, color="black", gid="baseline", label=baseline)
        ax.set_xlabel("FP16 outlier channels (% of inputs)")
        ax.set_ylabel("perplexity")
        ax.set_title("by outlier fraction", fontsize=10)
        ax.legend(fontsize=8, frameon=False)
    fig.suptitle(title or "WikiText-2 perplexity")
    save_figure(fig, path)
    return fig
