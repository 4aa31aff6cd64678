"""mixq.experiments.bench_attention: spec / CLI validation, speedup bookkeeping, and one smoke run (the CPU
configuration under the Triton interpreter) that writes JSON + Markdown. No speed is asserted."""
import json
import math

import pytest
import torch

from mixq.experiments import bench_attention as ba
from mixq.experiments.common import read_results

pytest.importorskip("transformers")          # mixq.hf.kv_cache builds on transformers' Cache


def test_spec_defaults_and_names():
    spec = ba.AttentionBenchSpec()
    assert spec.model_shape == "llama3-8b" and spec.decode_impl == "mixq_kv4"
    assert ba.smoke_spec().model_shape.startswith("hq")
    assert ba.smoke_spec(kv_bits=8).decode_impl == "mixq_kv8"
    assert isinstance(ba.smoke_spec(contexts=[40]).contexts, tuple)


@pytest.mark.parametrize("fields, match", [
    (dict(contexts=(0,)), "contexts"),
    (dict(contexts=(64, -1)), "contexts"),
    (dict(contexts=()), "contexts"),
    (dict(contexts="64"), "contexts"),
    (dict(contexts=(64.0,)), "contexts"),
    (dict(head_dim=15), "head_dim"),
    (dict(head_dim=0), "head_dim"),
    (dict(heads=4, kv_heads=3), "kv_heads"),
    (dict(batch=0), "batch"),
    (dict(decode_batches=(1, 0)), "decode_batches"),
    (dict(phases=("prefill", "train")), "phases"),
    (dict(kv_bits=2), "kv_bits"),
    (dict(kv_bits=True), "kv_bits"),
    (dict(group_size=0), "group_size"),
])
def test_spec_rejects_bad_values(fields, match):
    with pytest.raises(ValueError, match=match):
        ba.smoke_spec(**fields)


def test_spec_rejects_bad_dtype():
    with pytest.raises(TypeError, match="dtype"):
        ba.smoke_spec(dtype=torch.int8)


@pytest.mark.parametrize("argv", [
    ["--contexts", "0"],
    ["--contexts", "64,-8"],
    ["--contexts", "a,b"],
    ["--head-dim", "15"],
    ["--heads", "4", "--kv-heads", "3"],
    ["--decode-batches", "0"],
    ["--phases", "warmup"],
    ["--repeats", "0"],
    ["--kv-bits", "3"],
    ["--dtype", "int8"],
    ["--dtype", "bfloat16"],
])
def test_parse_args_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ba.parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_parse_args_smoke_defaults_and_overrides():
    args = ba.parse_args(["--smoke"])
    assert args.smoke and args.spec == ba.smoke_spec()
    args = ba.parse_args(["--smoke", "--contexts", "48,96", "--heads", "8", "--kv-heads", "2",
                          "--head-dim", "32", "--decode-batches", "3", "--phases", "decode"])
    s = args.spec
    assert (s.contexts, s.heads, s.kv_heads, s.head_dim) == ((48, 96), 8, 2, 32)
    assert s.decode_batches == (3,) and s.phases == ("decode",)


def _row(phase, ctx, batch, impl, ms):
    return {"model_shape": "m", "phase": phase, "context": ctx, "batch": batch, "impl": impl,
            "ms": ms, "speedup_vs_sdpa": None}


def test_add_speedups_and_target_check():
    big = ba.TARGET["context"]
    rows = [_row("decode", big, 1, "sdpa", 2.0), _row("decode", big, 1, "mixq_kv4", 1.0),
            _row("decode", big, 16, "sdpa", 3.0), _row("decode", big, 16, "mixq_kv4", 2.5),
            _row("decode", 512, 1, "sdpa", 1.0), _row("decode", 512, 1, "mixq_kv4", None),
            _row("prefill", big, 1, "mixq_q8k8v8p8", 1.0)]        # no sdpa row: no speedup
    ba.add_speedups(rows)
    assert rows[0]["speedup_vs_sdpa"] == 1.0
    assert rows[1]["speedup_vs_sdpa"] == pytest.approx(2.0 / 1.0)
    assert rows[3]["speedup_vs_sdpa"] == pytest.approx(3.0 / 2.5)
    assert rows[5]["speedup_vs_sdpa"] is None and rows[6]["speedup_vs_sdpa"] is None
    checks = ba.target_check(rows)
    assert [c["batch"] for c in checks] == [1, 16]
    assert [c["met"] for c in checks] == [2.0 >= ba.TARGET["min_speedup"],
                                          3.0 / 2.5 >= ba.TARGET["min_speedup"]]
    assert ba.target_check(rows[4:]) == []


def test_run_rejects_bad_arguments():
    with pytest.raises(TypeError, match="AttentionBenchSpec"):
        ba.run_attention_bench({"contexts": (64,)})
    with pytest.raises(ValueError, match="repeats"):
        ba.run_attention_bench(ba.smoke_spec(), repeats=0)


def test_smoke_run_writes_json_and_markdown(tmp_path, device, seed):
    spec = ba.smoke_spec(contexts=(40,), decode_batches=(1,))   # 40: one KV4 group + residual
    json_path, md_path = tmp_path / "attention.json", tmp_path / "attention.md"
    rows, meta = ba.run_attention_bench(spec, device=device, quick=True, repeats=1, seed=seed,
                                        json_path=str(json_path), md_path=str(md_path),
                                        progress=False)
    saved, saved_meta = read_results(json_path)
    assert isinstance(json.loads(json_path.read_text()), list) and saved == rows
    assert saved_meta["device"] == device.type and saved_meta["torch"] == torch.__version__
    assert saved_meta["triton"] and saved_meta["target"]["text"] == meta["target"]["text"]
    assert [(r["phase"], r["impl"]) for r in rows] == \
        [("prefill", i) for i in ba.PREFILL_IMPLS] + [("decode", "sdpa"), ("decode", "mixq_kv4")]
    for r in rows:
        assert all(k in r for k in ba.REQUIRED_ROW_KEYS), r
        assert not r.get("error"), r
        assert r["context"] == 40 and r["model_shape"] == spec.model_shape
        assert r["ms"] > 0 and math.isfinite(r["ms"])
        assert r["speedup_vs_sdpa"] > 0
        assert 0 <= r["max_abs_err"] < math.inf and 0 <= r["max_abs_err_vs_fp32"] < math.inf
    sdpa_dec, kv4_dec = rows[-2], rows[-1]
    assert sdpa_dec["kv_cache_bytes"] == 2 * 40 * spec.kv_heads * spec.head_dim * 2   # K+V bf16
    assert 0 < kv4_dec["kv_cache_bytes"] < sdpa_dec["kv_cache_bytes"]
    assert all(r["kv_cache_bytes"] is None for r in rows if r["phase"] == "prefill")
    md = md_path.read_text()
    assert "| phase |" in md and "Target" in md and "mixq_kv4" in md


def test_main_decode_only(tmp_path, capsys):
    path = tmp_path / "out" / "a.json"
    rc = ba.main(["--smoke", "--phases", "decode", "--contexts", "33",
                  "--decode-batches", "2", "--repeats", "1", "--json", str(path)])
    assert rc == 0
    rows = json.loads(path.read_text())
    assert [(r["phase"], r["batch"], r["impl"]) for r in rows] == \
        [("decode", 2, "sdpa"), ("decode", 2, "mixq_kv4")]
    assert "not measured" in capsys.readouterr().out          # 8192 was not run
