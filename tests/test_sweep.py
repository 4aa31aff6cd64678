"""mixq.sweep on the tiny staged Llama (CPU): rows, JSON rewritten per row, markdown, filters."""
import json

import pytest

pytest.importorskip("transformers")

from mixq.config import QuantConfig  # noqa: E402
from mixq.sweep import CONFIGS, SweepConfig, _select, run_sweep  # noqa: E402

KEYS = {"model", "config", "method", "w_bits", "a_bits", "outlier_frac", "ppl", "ppl_fp16",
        "ppl_ratio", "weight_bytes", "device", "device_name", "torch", "transformers",
        "config_s"}


def test_configs_build_and_names_unique():
    names = [c.name for c in CONFIGS]
    assert len(names) == len(set(names))
    for c in CONFIGS:
        assert isinstance(c.build(), QuantConfig)
    with pytest.raises(ValueError):
        _select(None, ["no-such-config"], None)
    assert [c.name for c in _select(None, None, names[1:])] == names[:1]


def test_run_sweep_stories260k(tmp_path):
    configs = [SweepConfig("w8a8", lambda: QuantConfig(mode="w8a8")),
               SweepConfig("w4a4-o2", lambda: QuantConfig(mode="w4a4", outlier_frac=0.02)),
               SweepConfig("skipped", lambda: QuantConfig(mode="w4a16"))]
    jp, mp = tmp_path / "r.json", tmp_path / "r.md"
    rows = run_sweep("stories260k", configs=configs, n_calib=4, calib_seqlen=128, seqlen=128,
                     max_windows=1, device="cpu", json_path=jp, md_path=mp, progress=False,
                     skip=["skipped"])
    assert [r["config"] for r in rows] == ["fp16", "w8a8", "w4a4-o2"]
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert "error" not in r
        assert r["ppl"] > 1 and r["ppl_fp16"] == rows[0]["ppl"]
    assert rows[2]["w_bits"] == 4 and rows[2]["a_bits"] == 4 and rows[2]["outlier_frac"] == 0.02
    assert rows[1]["weight_bytes"] < rows[0]["weight_bytes"]
    assert json.loads(jp.read_text()) == json.loads(json.dumps(rows))
    assert (tmp_path / "r.meta.json").is_file()
    md = mp.read_text()
    assert "| w4a4-o2 |" in md and "| fp16 |" in md
    # resume keeps the finished rows and runs nothing new
    again = run_sweep("stories260k", configs=configs[:2], n_calib=4, calib_seqlen=128,
                      seqlen=128, max_windows=1, device="cpu", json_path=jp, progress=False,
                      resume=True)
    assert [r["config"] for r in again] == ["fp16", "w8a8", "w4a4-o2"]
