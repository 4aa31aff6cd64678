"""mixq.experiments.plots: loading GEMM result files and the speedup plot, on fake rows
(nothing is timed)."""
import json
import random

import pytest

from mixq.experiments import bench_gemm as bench
from mixq.experiments import plots
from mixq.experiments.common import write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake(seed):
    """Rows of two shapes x three M, bf16 + two timed modes + one unavailable mode, as
    bench_gemm writes them; returns (rows, {(shape, M, mode): time_ms}, meta)."""
    rng = random.Random(seed)
    meta = {"device_name": "FakeGPU 80GB", "torch": "2.x", "triton": "3.x"}
    rows, times = [], {}
    for shape, n, k in (("8b.o", 4096, 4096), ("8b.down", 4096, 14336)):
        for m in (1, 16, 2048):
            for mode in ("bf16", "mixq_w4a4", "fp8_scaled_mm", "tinygemm_w4a16"):
                t = None if mode == "tinygemm_w4a16" else rng.uniform(0.01, 1.0)
                times[(shape, m, mode)] = t
                note = {"note": "unavailable: RuntimeError"} if t is None else {}
                rows.append(bench.make_row(meta, shape, n, k, m, mode, t,
                                           None if t is None else rng.uniform(0, 0.2), **note))
    return rows, times, meta


def _speedup(times, shape, m, mode):
    return times[(shape, m, "bf16")] / times[(shape, m, mode)]


@pytest.mark.parametrize("layout", ["results", "dict", "list"])
def test_load_both_layouts_and_fill_speedups(layout, tmp_path, seed):
    rows, times, meta = _fake(seed)
    path = tmp_path / "gemm.json"
    if layout == "results":  # write_results: rows + gemm.meta.json
        write_results(path, bench.add_speedups(rows), meta)
    elif layout == "dict":   # the older layout of the committed results/gemm_h100.json
        path.write_text(json.dumps({"meta": meta, "rows": bench.add_speedups(rows)}))
    else:  # a bare list without speedups: the loader computes them
        for r in rows:
            del r["speedup_vs_bf16"]
            del r["rel_err_vs_bf16"]
        path.write_text(json.dumps(rows))
    loaded, got_meta = plots.load_gemm_results(path)
    assert len(loaded) == len(rows)
    assert got_meta["device_name"] == meta["device_name"]
    assert got_meta["triton"] == meta["triton"]
    for r in loaded:
        if r["time_ms"] is None:
            assert r["speedup_vs_bf16"] is None
        else:
            assert r["speedup_vs_bf16"] == pytest.approx(_speedup(times, r["shape"], r["M"], r["mode"]))
        assert "rel_err_vs_bf16" in r


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        plots.load_gemm_results(bad)
    bad.write_text(json.dumps({"meta": {}}))
    with pytest.raises(ValueError, match="'rows'"):
        plots.load_gemm_results(bad)
    bad.write_text(json.dumps([{"shape": "8b.o", "M": 1, "mode": "bf16"}]))
    with pytest.raises(ValueError, match=r"lacks keys \['N', 'K', 'time_ms'\]"):
        plots.load_gemm_results(bad)
    bad.write_text(json.dumps("rows"))
    with pytest.raises(TypeError, match="expected a dict"):
        plots.load_gemm_results(bad)
    with pytest.raises(FileNotFoundError):
        plots.load_gemm_results(tmp_path / "missing.json")


def test_plot_draws_speedups_and_saves_png(tmp_path, seed):
    rows, times, _ = _fake(seed)
    path = tmp_path / "sub" / "speedup.png"
    fig = plots.gemm_speedup_plot(rows, path)          # rows without computed speedups
    assert path.read_bytes()[:8] == PNG_MAGIC
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
    assert [ax.get_title().split()[0] for ax in axes] == ["8b.o", "8b.down"]
    for ax in axes:
        shape = ax.get_title().split()[0]
        lines = {ln.get_gid(): ln for ln in ax.lines}
        assert set(lines) == {"bf16", "fp8_scaled_mm", "mixq_w4a4"}   # tinygemm never ran
        for mode in ("bf16", "mixq_w4a4"):
            x, y = lines[mode].get_data()
            assert list(x) == [1, 16, 2048]
            assert list(y) == pytest.approx([_speedup(times, shape, m, mode) for m in x])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0].startswith("bf16") and "mixq W4A4" in labels
    assert "FakeGPU" in fig._suptitle.get_text()


def test_plot_modes_subset_and_errors(seed):
    rows, _, _ = _fake(seed)
    fig = plots.gemm_speedup_plot(bench.add_speedups(rows), modes=["mixq_w4a4"], ncols=1)
    assert {ln.get_gid() for ax in fig.axes for ln in ax.lines} == {"mixq_w4a4"}
    with pytest.raises(ValueError, match="no row with a timing"):
        plots.gemm_speedup_plot(rows, modes=["tinygemm_w4a16"])
    with pytest.raises(ValueError, match="no rows"):
        plots.gemm_speedup_plot([])
    with pytest.raises(ValueError, match="ncols"):
        plots.gemm_speedup_plot(rows, ncols=0)


def test_project_dir_is_repo_folder_in_a_checkout():
    from mixq.data import REPO_ROOT

    assert plots.project_dir("figures") == REPO_ROOT / "figures"


# ------------------------------------------------------------------------------- LLM notebook plots
def test_channel_absmax_plot_panels_median_and_png(tmp_path, seed):
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(64, generator=gen) + 0.5
    a[7] = 100.0                                          # one outlier channel
    b = np.linspace(1.0, 3.0, 32)
    path = tmp_path / "f" / "absmax.png"
    fig = plots.channel_absmax_plot({"layer 0 q/k/v": a, "layer 0 down": b}, path, ncols=1)
    assert path.read_bytes()[:8] == PNG_MAGIC
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2
    lines = {ln.get_gid(): ln for ln in axes[0].lines}
    x, y = lines["absmax"].get_data()
    assert list(x) == list(range(64)) and y[7] == pytest.approx(100.0)
    assert lines["median"].get_ydata()[0] == pytest.approx(float(np.median(a.numpy())))
    ratio = 100.0 / float(np.median(a.numpy()))
    assert f"max/median = {ratio:.1f}" in axes[0].get_title()
    assert axes[0].get_yscale() == "log"


def test_channel_absmax_plot_errors():
    with pytest.raises(ValueError, match="non-empty mapping"):
        plots.channel_absmax_plot({})
    with pytest.raises(ValueError, match="1-D"):
        plots.channel_absmax_plot({"x": [[1.0, 2.0]]})
    with pytest.raises(ValueError, match="ncols"):
        plots.channel_absmax_plot({"x": [1.0]}, ncols=0)


def _ppl_rows():
    return [{"name": "FP16", "ppl": 10.0, "outlier_frac": None},
            {"name": "W4A4 RTN", "ppl": 40.0, "outlier_frac": 0.0},
            {"name": "W4A4 + 1% outliers", "ppl": 20.0, "outlier_frac": 0.01},
            {"name": "W4A4 + 5% outliers", "ppl": 12.0, "outlier_frac": 0.05},
            {"name": "W4A4 + GPTQ", "ppl": 15.0}]


def test_perplexity_plot_bars_sweep_baseline(tmp_path):
    rows = _ppl_rows()
    path = tmp_path / "ppl.png"
    fig = plots.perplexity_plot(rows, path, baseline="FP16")
    assert path.read_bytes()[:8] == PNG_MAGIC
    bars_ax, sweep_ax = fig.axes[:2]
    widths = [p.get_width() for p in bars_ax.patches]
    assert widths == [r["ppl"] for r in rows]
    top_down = sorted(bars_ax.get_yticklabels(), key=lambda t: -t.get_position()[1])
    assert [t.get_text() for t in top_down] == [r["name"] for r in rows]   # first row on top
    line = next(ln for ln in sweep_ax.lines if ln.get_gid() == "outliers")
    x, y = line.get_data()
    assert list(x) == pytest.approx([0.0, 1.0, 5.0]) and list(y) == [40.0, 20.0, 12.0]
    assert any(ln.get_gid() == "baseline" for ln in sweep_ax.lines)
    assert any(ln.get_gid() == "baseline" for ln in bars_ax.lines)


def test_perplexity_plot_without_sweep_and_errors():
    rows = [{"name": "FP16", "ppl": 10.0}, {"name": "W8A8", "ppl": 10.5}]
    fig = plots.perplexity_plot(rows)
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="non-empty"):
        plots.perplexity_plot([])
    with pytest.raises(ValueError, match="'name' and 'ppl'"):
        plots.perplexity_plot([{"ppl": 3.0}])
    with pytest.raises(ValueError, match="finite positive"):
        plots.perplexity_plot([{"name": "x", "ppl": float("nan")}])
    with pytest.raises(ValueError, match="baseline"):
        plots.perplexity_plot(rows, baseline="FP32")
    with pytest.raises(TypeError, match="must be a dict"):
        plots.perplexity_plot([3])
