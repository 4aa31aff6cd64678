"""mixq.experiments.common: the environment, the result files, the Markdown table, the common
flags and the helpers every driver shares."""
import argparse
import json
import math
import random

import pytest
import torch

from mixq.experiments import common


# ------------------------------------------------------------------------------ environment
def test_environment_schema():
    env = common.environment("cpu")
    assert tuple(env) == common.ENV_KEYS
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["device_name"]
    assert env["python"].count(".") == 2


def test_device_slug():
    assert common.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert common.device_slug("NVIDIA H200") == "h200"
    assert common.device_slug("cpu") == "cpu"
    assert common.device_slug("Some Accelerator v2") == "some_accelerator_v2"
    with pytest.raises(ValueError):
        common.device_slug("")


def test_torch_dtype_and_lists():
    assert [common.torch_dtype(d) for d in common.DTYPES] == \
        [torch.float16, torch.bfloat16, torch.float32]
    with pytest.raises(ValueError, match="dtype"):
        common.torch_dtype("float16")
    assert common.comma_list(" a, b,,c ") == ["a", "b", "c"] and common.comma_list(None) == []
    assert common.int_list("1, 16", "--batches") == [1, 16]
    for bad in ("", "0", "1,x"):
        with pytest.raises(ValueError, match="--batches"):
            common.int_list(bad, "--batches")


# ------------------------------------------------------------------------------ result files
def test_write_and_read_results_roundtrip(tmp_path, seed):
    rng = random.Random(seed)
    rows = [{"config": f"c{i}", "ppl": rng.uniform(1, 9), "nested": [1.0, float("inf")]}
            for i in range(3)]
    rows.append({"config": "bad", "ppl": float("nan")})
    meta = {"model": "m", "device": "cpu", "device_name": "CPU", "x": float("-inf")}
    path = common.write_results(tmp_path / "sub" / "r.json", rows, meta)
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json", "r.meta.json"]
    data = json.loads(path.read_text())           # strict JSON: no NaN / Infinity tokens
    assert isinstance(data, list) and data[-1]["ppl"] is None and data[0]["nested"] == [1.0, None]
    assert [r["ppl"] for r in data[:3]] == [r["ppl"] for r in rows[:3]]
    got, got_meta = common.read_results(path)
    assert got == data and got_meta["x"] is None and got_meta["model"] == "m"
    common.append_results(path, [{"config": "more"}], meta)
    assert [r["config"] for r in common.read_results(path)[0]] == ["c0", "c1", "c2", "bad", "more"]


def test_read_results_older_layout_and_errors(tmp_path):
    old = tmp_path / "gemm_x.json"
    old.write_text(json.dumps({"meta": {"gpu": "G"}, "rows": [{"a": 1, "torch": "9"}]}))
    rows, meta = common.read_results(old)
    assert rows == [{"a": 1, "torch": "9"}] and meta["gpu"] == "G" and meta["torch"] == "9"
    bad = tmp_path / "bad.json"
    for text, err, match in (("{no", ValueError, "not valid JSON"),
                             (json.dumps({"meta": {}}), ValueError, "'rows'"),
                             (json.dumps("rows"), TypeError, "expected a dict"),
                             (json.dumps([3]), TypeError, "row 0")):
        bad.write_text(text)
        with pytest.raises(err, match=match):
            common.read_results(bad)
    with pytest.raises(FileNotFoundError):
        common.read_results(tmp_path / "missing.json")


def test_write_text_is_atomic(tmp_path):
    path = common.write_text(tmp_path / "a" / "t.md", "hello\n")
    assert path.read_text() == "hello\n" and [p.name for p in path.parent.iterdir()] == ["t.md"]
    assert common.finite({"a": (1.0, math.nan)}) == {"a": [1.0, None]}


# ------------------------------------------------------------------------------ markdown_table
def test_markdown_table_formats_aligns_and_escapes(seed):
    rng = random.Random(seed)
    rows = [{"name": f"m|{i}", "x": rng.uniform(0, 10), "n": i, "opt": None if i % 2 else 1.5}
            for i in range(3)]
    text = common.markdown_table(rows, ["name", ("x", "x", ".3f"), ("n+1", lambda r: r["n"] + 1),
                                        ("opt", "opt", "{:.1f}x")])
    lines = text.split("\n")
    assert lines[0] == "| name | x | n+1 | opt |"
    assert lines[1] == "|---|---:|---:|---:|"               # numbers right-aligned
    assert len(lines) == 2 + len(rows)
    for line, r in zip(lines[2:], rows):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert cells[0] == r["name"].replace("|", "\\|")
        assert cells[1] == f"{r['x']:.3f}" and cells[2] == str(r["n"] + 1)
        assert cells[3] == ("-" if r["opt"] is None else f"{r['opt']:.1f}x")
    forced = common.markdown_table(rows, ["n"], align="l")
    assert forced.split("\n")[1] == "|---|"


def test_markdown_table_errors():
    with pytest.raises(TypeError, match="sequence of mappings"):
        common.markdown_table({"a": 1}, ["a"])
    with pytest.raises(TypeError, match="row 0"):
        common.markdown_table([3], ["a"])
    with pytest.raises(ValueError, match="non-empty"):
        common.markdown_table([{"a": 1}], [])
    with pytest.raises(TypeError, match="column"):
        common.markdown_table([{"a": 1}], [("a",)])
    with pytest.raises(ValueError, match="align"):
        common.markdown_table([{"a": 1}], ["a"], align="lr")


def test_environment_note_names_device_and_versions():
    note = common.environment_note({"gpu": "FakeGPU", "torch": "9.9", "triton": "8.8",
                                    "cuda": "12.0"}, "results/x.json")
    assert note.startswith("Device: FakeGPU;")
    for part in ("torch 9.9", "triton 8.8", "CUDA 12.0", "`results/x.json`"):
        assert part in note
    assert common.environment_note({"device_name": "A", "device": "cuda"}).startswith("Device: A")
    with pytest.raises(TypeError):
        common.environment_note(["gpu"])


# ------------------------------------------------------------------------------ flags
def test_add_common_flags():
    p = common.add_common_flags(argparse.ArgumentParser(), "model", "dtype", "json", "quiet",
                                model={"required": True}, dtype={"default": "bf16"})
    args = p.parse_args(["--model", "m", "--json", "x.json"])
    assert (args.model, args.dtype, args.json, args.quiet) == ("m", "bf16", "x.json", False)
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--dtype", "float16"])      # one spelling everywhere
    with pytest.raises(SystemExit):
        p.parse_args([])                                           # --model required here
    with pytest.raises(ValueError, match="unknown common flags"):
        common.add_common_flags(argparse.ArgumentParser(), "skip")


def test_input_sets_bounds():
    assert common.input_sets(1) == 8 and common.input_sets(1 << 30) == 1
    assert common.input_sets(100 << 20) == 2
