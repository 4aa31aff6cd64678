"""Figures from benchmark results (``results/*.json``): load the rows, plot speedup vs M.

The GEMM benchmark (`mixq.bench`, ``python -m mixq bench gemm --json PATH``) writes one row per
(shape, M, mode)::

    {"shape": "8b.gate_up", "N": 28672, "K": 4096, "M": 2048, "mode": "mixq_w4a4",
     "time_ms": 0.385, "speedup_vs_bf16": 1.6, "rel_err_vs_bf16": 0.09, "gpu": ..., ...}

where ``speedup_vs_bf16 = time_ms(bf16, same shape and M) / time_ms(mode)`` and ``time_ms`` is
None for a mode that could not run on that machine. `load_gemm_results` reads such a file (the
``{"meta": ..., "rows": [...]}`` dict that `mixq.bench.write_json` writes, or a bare list of
rows) and `gemm_speedup_plot` draws one panel per shape: speedup over bf16 against M (log
scale), one line per mode, bf16 itself as the dashed line at 1.

Plots are drawn on a `matplotlib.figure.Figure` (no pyplot, no global backend switch), so they
work headless (Agg) and inside notebooks alike.
"""
from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from mixq.data import project_dir  # re-exported: notebooks call plots.project_dir

__all__ = ["GEMM_PLOT_MODES", "REQUIRED_ROW_KEYS", "project_dir", "load_gemm_results",
           "gemm_speedup_plot"]

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
    """Copies of `rows`; ``speedup_vs_bf16`` recomputed (mixq.bench.add_speedups) when a timed
    row lacks it (or has None, as `mixq.bench.make_row` leaves it), ``rel_err_vs_bf16``
    defaulted to None."""
    rows = copy.deepcopy(rows)
    for r in rows:
        r.setdefault("rel_err_vs_bf16", None)
    if any(r["time_ms"] is not None and r.get("speedup_vs_bf16") is None for r in rows):
        from mixq.bench import add_speedups
        add_speedups(rows)
    return rows


def load_gemm_results(path: str | os.PathLike) -> tuple[list[dict], dict]:
    """Read GEMM benchmark rows written by ``python -m mixq bench gemm --json PATH``.

    Args:
        path: a JSON file holding either ``{"meta": {...}, "rows": [row, ...]}`` (what
            `mixq.bench.write_json` writes) or a bare list ``[row, ...]``. Every row needs the
            keys `REQUIRED_ROW_KEYS` (shape str, N int, K int, M int, mode str, time_ms float
            or None).
    Returns:
        ``(rows, meta)``: rows as a list of dicts, each with ``speedup_vs_bf16`` (computed from
        the bf16 row of the same shape and M when the file lacks it; None without a timing)
        and ``rel_err_vs_bf16`` (None when absent); meta the file's "meta" dict, or for a bare
        list the ``gpu`` /
        ``torch`` / ``triton`` of the first row.
    Raises:
        FileNotFoundError: no such file. ValueError: not JSON, no rows, or a row lacking a key.
        TypeError: the JSON is neither a dict with "rows" nor a list of dicts.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if isinstance(data, dict):
        if "rows" not in data:
            raise ValueError(f"{path}: a dict of results needs a 'rows' list, "
                             f"got keys {sorted(data)}")
        rows, meta = data["rows"], data.get("meta") or {}
        if not isinstance(meta, dict):
            raise TypeError(f"{path}: 'meta' must be a dict, got {type(meta).__name__}")
    elif isinstance(data, list):
        rows, meta = data, None
    else:
        raise TypeError(f"{path}: expected a dict with 'rows' or a list of rows, "
                        f"got {type(data).__name__}")
    rows = _with_speedups(_check_rows(rows, str(path)))
    if meta is None:
        meta = {k: rows[0].get(k) for k in ("gpu", "torch", "triton")}
    return rows, dict(meta)


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
        title: figure title; default ``"GEMM speedup over bf16 on <gpu>"``.
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
    gpu = next((r.get("gpu") for r in rows if r.get("gpu")), None)
    fig.suptitle(title or "GEMM speedup over bf16" + (f" on {gpu}" if gpu else ""))
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
