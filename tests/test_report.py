"""mixq.experiments.report: README marker blocks, and the report over a copy of results/ (the
Markdown table and the environment line: tests/test_experiments_common.py)."""
import json
import random
import shutil
from pathlib import Path

import pytest

from mixq.data import REPO_ROOT
from mixq.experiments import report
from mixq.experiments.plots import load_gemm_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULTS = REPO_ROOT / "results"


# ------------------------------------------------------------------------------- update_readme
README = """# title

intro
<!-- results:alpha -->
old alpha
<!-- /results:alpha -->
middle
<!-- results:beta -->
old beta
<!-- /results:beta -->
end
"""


def test_update_readme_replaces_only_existing_blocks():
    new = report.update_readme(README, {"alpha": "NEW A\n| t |", "gamma": "never added"})
    assert "NEW A\n| t |\n<!-- /results:alpha -->" in new
    assert "old alpha" not in new and "old beta" in new       # beta has no table: untouched
    assert "never added" not in new and "gamma" not in new
    assert new.replace("NEW A\n| t |", "old alpha") == README  # nothing else changed
    assert report.update_readme(new, {"alpha": "NEW A\n| t |"}) == new   # idempotent
    assert report.readme_blocks(README) == ["alpha", "beta"]
    assert report.update_readme("no markers\n", {"alpha": "x"}) == "no markers\n"


def test_update_readme_rejects_broken_markers():
    with pytest.raises(ValueError, match="pair up"):
        report.update_readme(README.replace("<!-- /results:beta -->", ""), {})
    with pytest.raises(ValueError, match="duplicated"):
        report.update_readme(README + README, {})
    with pytest.raises(TypeError):
        report.update_readme(README, {"alpha": 3})
    with pytest.raises(TypeError):
        report.update_readme(b"bytes", {})


# ----------------------------------------------------------------------------- whole report
def _fake_llm(path: Path, seed: int) -> list[dict]:
    """A sweep-like file: fp16 baseline, RTN rows over outlier fractions, an error row and a
    row without ppl (both must be skipped), and a meta listing one config that never ran."""
    rng = random.Random(seed)
    env = {"device": "cuda", "torch": "2.x", "transformers": "5.x", "device_name": "FakeGPU"}
    base = rng.uniform(10, 30)
    rows = [{"config": "fp16", "method": "-", "mode": "fp16", "outlier_frac": 0.0, "ppl": base,
             "ppl_ratio": 1.0, **env}]
    for frac in (0.0, 0.01, 0.05):
        p = base * rng.uniform(1.1, 3.0)
        rows.append({"config": f"w4a4-o{frac:g}", "method": "RTN", "mode": "w4a4", "w_bits": 4,
                     "a_bits": 4, "outlier_frac": frac, "ppl": p, "ppl_ratio": p / base, **env})
    rows.append({"config": "w4a4-broken", "method": "GPTQ", "mode": "w4a4",
                 "error": "RuntimeError: boom", **env})
    rows.append({"config": "w4a4-noppl", "method": "AWQ", "mode": "w4a4", "ppl": None, **env})
    path.write_text(json.dumps(rows))
    meta = {"model": "fake", "seqlen": 64, "configs": [r["config"] for r in rows] + ["never-ran"],
            **env}
    path.with_name(path.name.replace(".json", ".meta.json")).write_text(json.dumps(meta))
    return rows


@pytest.fixture
def workspace(tmp_path, seed):
    """A temp copy of results/ plus a fake LLM sweep file, and a README with marker blocks."""
    res = tmp_path / "results"
    shutil.copytree(RESULTS, res)
    llm_rows = _fake_llm(res / "llm_fake.json", seed)
    blocks = ["llm_fake", "not_a_result"] + (["gemm_h100"] if (res / "gemm_h100.json").exists()
                                             else [])
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n" + "".join(f"before {b}\n<!-- results:{b} -->\nstale {b}\n"
                                         f"<!-- /results:{b} -->\nafter {b}\n" for b in blocks))
    return res, tmp_path / "figures", readme, llm_rows


def test_report_cli_writes_tables_figures_and_check_detects_staleness(workspace, capsys):
    res, figs, readme, llm_rows = workspace
    args = ["--results", str(res), "--figures", str(figs), "--readme", str(readme)]
    assert report.main(args + ["--check"]) == 1                      # "stale ..." blocks
    assert "stale" in capsys.readouterr().out
    assert report.main(args) == 0
    text = readme.read_text()
    assert "stale llm_fake" not in text and "stale not_a_result" in text   # unknown block kept
    for b in ("llm_fake", "not_a_result"):
        assert f"before {b}\n<!-- results:{b} -->" in text and f"-->\nafter {b}\n" in text
    block = text.split("<!-- results:llm_fake -->")[1].split("<!-- /results:llm_fake -->")[0]
    assert "Device: FakeGPU" in block and "torch 2.x" in block and "transformers 5.x" in block
    table_lines = [ln for ln in block.splitlines() if ln.startswith("| w4a4") or
                   ln.startswith("| fp16")]
    ok = [r for r in llm_rows if r.get("ppl") is not None and not r.get("error")]
    assert len(table_lines) == len(ok)
    for line, r in zip(table_lines, ok):
        assert line.startswith(f"| {r['config']} |") and f"| {r['ppl']:.3f} |" in line
    skipped_line = next(ln for ln in block.splitlines() if ln.startswith("Skipped"))
    assert "`w4a4-broken` (RuntimeError: boom)" in skipped_line and "`w4a4-noppl`" in skipped_line
    assert "`never-ran`" in block
    if (res / "gemm_h100.json").exists():
        rows, meta = load_gemm_results(res / "gemm_h100.json")
        gblock = text.split("<!-- results:gemm_h100 -->")[1]
        assert meta["gpu"] in gblock                 # the committed file's device key
        for r in rows:
            if r["mode"] == "bf16" and r["shape"].startswith("8b."):
                assert f"| {r['shape']} ({r['N']}x{r['K']}) | {r['M']} | {r['time_ms']:.4f} |" \
                    in gblock
    pngs = sorted(figs.glob("report_*.png"))
    assert figs / "report_llm_fake_perplexity.png" in pngs
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    out = capsys.readouterr().out
    assert "skipped llm_fake.json: w4a4-broken" in out
    assert report.main(args + ["--check"]) == 0                      # up to date now
    readme.write_text(text.replace("| fp16 |", "| fp16 (edited) |"))
    assert report.main(args + ["--check"]) == 1
    assert "llm_fake" in capsys.readouterr().out


def test_build_report_skips_absent_and_unreadable_files(tmp_path):
    (tmp_path / "e2e_fake.json").write_text("{not json")
    (tmp_path / "w4a4_variants_fake.json").write_text("[]")         # not a report kind
    rep = report.build_report(tmp_path, tmp_path / "f", progress=False)
    assert rep.tables == {} and rep.figures == []
    assert rep.skipped[0][0] == "e2e_fake.json" and "unreadable" in rep.skipped[0][2]
    assert report.result_kind("results/e2e_h100.meta.json") is None
    assert report.result_kind("gemm_h100.json") == "gemm"
    with pytest.raises(FileNotFoundError):
        report.build_report(tmp_path / "missing", progress=False)


def test_full_table_shows_each_step_and_notes(tmp_path):
    rows = [{"config": "fp16", "ppl": 19.2, "ppl_ratio": 1.0, "kv_bytes": 100},
            {"config": "linear", "ppl": 25.0, "ppl_ratio": 25.0 / 19.2, "kv_bytes": 100},
            {"config": "norm", "ppl": None, "ppl_ratio": None, "kv_bytes": 30,
             "note": "kernel path only"}]
    (tmp_path / "full_tiny.json").write_text(json.dumps(rows))
    (tmp_path / "full_tiny.meta.json").write_text(json.dumps(
        {"model": "tiny", "linear_config": "w4a4-o1", "seqlen": 64, "device_name": "CPU"}))
    rep = report.build_report(tmp_path, tmp_path / "fig", figures=False, progress=False)
    table = rep.tables["full_tiny"]
    assert "`w4a4-o1`" in table and "| linear | 25.000 | 1.3021 | 100 |" in table
    assert "| norm | - | - | 30 | kernel path only |" in table
