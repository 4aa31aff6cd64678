"""mixq.experiments.sweep on the tiny staged Llama (CPU): rows, JSON rewritten per row,
markdown, filters."""
import json

import pytest

pytest.importorskip("transformers")

from mixq.experiments.sweep import main, run_sweep, select_presets  # noqa: E402
from mixq.presets import preset_names  # noqa: E402

KEYS = {"model", "config", "method", "w_bits", "a_bits", "outlier_frac", "ppl", "ppl_fp16",
        "ppl_ratio", "weight_bytes", "device", "device_name", "torch", "transformers",
        "config_s"}


def test_presets_selected_by_name():
    names = preset_names()
    assert len(names) == len(set(names))
    assert select_presets() == names
    with pytest.raises(ValueError):
        select_presets(only=["no-such-config"])
    with pytest.raises(ValueError, match="unknown presets"):
        select_presets(["w4a4-o1+kv4"])            # the sweep runs catalogue entries only
    assert select_presets(exclude=names[1:]) == names[:1]
    assert select_presets(names[:3], only=names[1:2]) == names[1:2]


def test_cli_lists_the_catalogue_and_rejects_unknown_names(capsys):
    assert main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == preset_names()
    with pytest.raises(SystemExit):
        main(["--model", "stories260k", "--exclude", "no-such-config"])
    with pytest.raises(SystemExit):
        main(["--list", "--skip", "w8a8"])         # --skip is quantize's (module patterns)


def test_run_sweep_stories260k(tmp_path):
    presets = ["w8a8", "w4a4-o2", "w4a16-g128"]
    jp, mp = tmp_path / "r.json", tmp_path / "r.md"
    rows, meta = run_sweep("stories260k", presets=presets, n_calib=4, calib_seqlen=128,
                           seqlen=128, max_windows=1, device="cpu", json_path=jp, md_path=mp,
                           progress=False, exclude=["w4a16-g128"])
    assert [r["config"] for r in rows] == ["fp16", "w8a8", "w4a4-o2"]
    assert meta["configs"] == ["w8a8", "w4a4-o2"] and meta["model"] == "stories260k"
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
    again, _ = run_sweep("stories260k", presets=presets[:2], n_calib=4, calib_seqlen=128,
                         seqlen=128, max_windows=1, device="cpu", json_path=jp, progress=False,
                         resume=True)
    assert [r["config"] for r in again] == ["fp16", "w8a8", "w4a4-o2"]
