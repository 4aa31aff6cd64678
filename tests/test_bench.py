"""mixq.experiments.bench_gemm formatting and argument logic with fake timings (nothing is
timed here)."""
import json
import random

import pytest

from mixq.experiments import bench_gemm as bench
from mixq.nn import linear as qnn_linear
from mixq.experiments.common import write_results


def _meta():
    return {"device_name": "FakeGPU 80GB", "torch": "2.x", "triton": "3.x", "cuda": "13.0",
            "copy_bandwidth_gbs": 3000.0}


def _rows(seed):
    rng = random.Random(seed)
    meta = _meta()
    t_bf16 = {1: rng.uniform(0.01, 0.1), 2048: rng.uniform(0.5, 1.0)}
    rows = []
    for m in (1, 2048):
        rows.append(bench.make_row(meta, "8b.gate_up", 28672, 4096, m, "bf16", t_bf16[m], 0.0))
        rows.append(bench.make_row(meta, "8b.gate_up", 28672, 4096, m, "mixq_w4a4",
                                   t_bf16[m] / 2, 0.1, bytes=123))
        rows.append(bench.make_row(meta, "8b.gate_up", 28672, 4096, m, "tinygemm_w4a16", None,
                                   None, note="unavailable: RuntimeError: no kernel"))
    rows.append(bench.make_row(meta, "8b.gate_up", 28672, 4096, 2048, "mixq_quant", 0.01, None,
                               frac_of_copy_bw=0.7321))
    return rows, t_bf16


def test_add_speedups_uses_bf16_of_same_shape_and_m(seed):
    rows, t_bf16 = _rows(seed)
    bench.add_speedups(rows)
    by = {(r["M"], r["mode"]): r for r in rows}
    assert by[(1, "bf16")]["speedup_vs_bf16"] == pytest.approx(1.0)
    assert by[(1, "mixq_w4a4")]["speedup_vs_bf16"] == pytest.approx(2.0)
    assert by[(2048, "mixq_w4a4")]["speedup_vs_bf16"] == pytest.approx(2.0)
    assert by[(2048, "mixq_quant")]["speedup_vs_bf16"] == pytest.approx(t_bf16[2048] / 0.01)
    assert by[(1, "tinygemm_w4a16")]["speedup_vs_bf16"] is None


def test_format_table_columns_and_values(seed):
    rows, t_bf16 = _rows(seed)
    text = bench.format_table(bench.add_speedups(rows))
    header = text.splitlines()[0].split()
    assert header == ["shape", "M", "mode", "NxK", "time_ms", "speedup_vs_bf16", "rel_err_vs_bf16"]
    line = next(ln for ln in text.splitlines() if " mixq_w4a4 " in ln and ln.split()[1] == "2048")
    cells = line.split()
    assert cells[3] == "28672x4096"
    assert float(cells[4]) == pytest.approx(t_bf16[2048] / 2, abs=1e-4)
    assert cells[5] == "2.00" and cells[6] == "1.00e-01"
    na = next(ln for ln in text.splitlines() if "tinygemm_w4a16" in ln)
    assert "n/a" in na


def test_markdown_and_json_roundtrip(tmp_path, seed):
    rows, _ = _rows(seed)
    bench.add_speedups(rows)
    meta = _meta()
    md = bench.format_markdown(rows, meta)
    assert md.startswith("# GEMM benchmark: FakeGPU 80GB")
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert table[0].split("|")[1:-1][:7] == [" shape ", " M ", " mode ", " NxK ", " time_ms ",
                                             " speedup_vs_bf16 ", " rel_err_vs_bf16 "]
    assert len(table) == 1 + len(rows)
    assert "73% of copy BW" in md and "unavailable: RuntimeError" in md
    path = tmp_path / "out" / "gemm.json"
    write_results(path, rows, meta)
    data = json.loads(path.read_text())
    assert json.loads((tmp_path / "out" / "gemm.meta.json").read_text())["device_name"] == \
        "FakeGPU 80GB"
    required = {"device_name", "shape", "N", "K", "M", "mode", "time_ms", "speedup_vs_bf16",
                "rel_err_vs_bf16", "torch", "triton"}
    assert all(required <= set(r) for r in data)
    assert data == rows


def test_parse_args_and_shapes():
    a = bench.parse_args(["--shapes", "8b.gate_up,1b", "--m", "3,2048",
                          "--json", "x.json", "--modes", "mixq_w4a4,bf16"])
    assert a.shape_list[0] == ("8b.gate_up", 28672, 4096)
    assert [s[0] for s in a.shape_list[1:]] == ["1b.qkv", "1b.o", "1b.gate_up", "1b.down",
                                               "1b.lm_head"]
    assert a.m_list == [3, 2048] and a.json == "x.json"
    assert a.mode_list == ["bf16", "mixq_w4a4"]
    q = bench.parse_args(["--quick"])
    assert q.m_list == list(bench.QUICK_M) and len(q.shape_list) == 9
    assert bench.parse_args([]).m_list == list(bench.DEFAULT_M)
    with pytest.raises(ValueError, match="unknown model"):
        bench.select_shapes("70b")
    with pytest.raises(ValueError, match="no layer"):
        bench.select_shapes("8b.lm_head")
    with pytest.raises(ValueError, match="--m"):
        bench.parse_args(["--m", "1,x"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "fp4"])


@pytest.mark.parametrize("k,expected", [(2048, 16), (4096, 48), (8192, 80), (14336, 144),
                                        (64, 16)])
def test_outlier_count(k, expected):
    assert bench.outlier_count(k) == expected
    assert expected % 16 == 0


def test_module_modes_expand_and_get_eager_overheads(seed, monkeypatch):
    """``--modes module`` = the nn modules and the kernels they launch; a module row's
    eager_overhead_us is its eager time minus its kernels' eager time (at M=1 W4A4Linear runs
    act-quant + GEMM at every M; the fused decode kernel only when switched on)."""
    a = bench.parse_args(["--modes", "module"])
    assert a.mode_list == ["bf16", "mixq_w4a16", "mixq_w4a4+quant", "mixq_w4a4_decode",
                           "bf16_module", "mixq_w4a16_module", "mixq_w4a4_module"]
    assert set(bench.parse_args(["--modes", "all"]).mode_list) == set(bench.MODES)
    rng = random.Random(seed)
    meta, t = _meta(), rng.uniform(0.01, 0.05)
    rows = [bench.make_row(meta, "8b.o", 4096, 4096, 1, mode, t, 0.0, eager_ms=e)
            for mode, e in [("bf16", 0.020), ("mixq_w4a4+quant", 0.015),
                            ("bf16_module", 0.030), ("mixq_w4a4_module", 0.024)]]
    by = {r["mode"]: r for r in bench.add_speedups(rows)}
    assert by["mixq_w4a4_module"]["eager_overhead_us"] == pytest.approx(9.0)
    assert by["mixq_w4a4_module"]["eager_speedup_vs_bf16"] == pytest.approx(0.030 / 0.024)
    assert by["bf16_module"]["eager_overhead_us"] == pytest.approx(10.0)
    assert "+9.0 us over its kernels" in bench.format_markdown(rows, meta)
    assert bench.module_kernels("mixq_w4a4_module", 2048) == "mixq_w4a4+quant"
    assert bench.module_kernels("mixq_w4a4_module", 1) == "mixq_w4a4+quant"
    monkeypatch.setattr(qnn_linear, "W4A4_DECODE_MAX_M", 16)   # the fused decode kernel on
    assert bench.module_kernels("mixq_w4a4_module", 1) == "mixq_w4a4_decode"
