"""mixq.experiments.bench_e2e on the tiny smoke Llama (CPU): rows, JSON + meta, CLI, errors. No
speed is asserted: only that every phase ran and produced a positive finite throughput."""
import json
import math

import pytest
import torch

from mixq.experiments import bench_e2e, report

pytest.importorskip("transformers")


def test_build_model_and_configs():
    model, full = bench_e2e.build_model("tiny", layers=1, dtype=torch.float32)
    assert full == bench_e2e.TINY_LLAMA["num_hidden_layers"] and len(model.model.layers) == 1
    assert next(model.parameters()).dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32             # restored
    assert bench_e2e.quant_config("bf16") is None
    cfg = bench_e2e.quant_config("w4a4-o1-salient")
    assert cfg.mode == "w4a4" and cfg.outlier_frac == 0.01 and cfg.outlier_strategy == "max"
    full = bench_e2e.quant_config("w4a4-o1-salient+kv4+attn")
    assert full.kv_cache is not None and full.attention is not None
    assert [bench_e2e.quant_config(m) is None for m in bench_e2e.DEFAULT_MODES] == \
        [True] + [False] * (len(bench_e2e.DEFAULT_MODES) - 1)
    with pytest.raises(ValueError, match="unknown model"):
        bench_e2e.build_model("gpt5")
    with pytest.raises(ValueError, match="layers"):
        bench_e2e.build_model("tiny", layers=0)
    with pytest.raises(ValueError, match="asked for"):
        bench_e2e.build_model("tiny", layers=99)
    with pytest.raises(ValueError, match="unknown mode"):
        bench_e2e.quant_config("w2a2")


def test_run_e2e_tiny_rows_and_json(tmp_path, seed):
    path = tmp_path / "e2e_cpu.json"
    modes = ["bf16", "w4a4-o1-salient", "w4a4-o1-salient+kv4+attn"]
    rows, meta = bench_e2e.run_e2e(["tiny"], modes, prompt_len=16, decode_prompt_len=4,
                                   new_tokens=2, batches=(1, 2), repeats=1, device="cpu",
                                   json_path=path, progress=False)
    assert [(r["mode"], r["phase"], r["batch"]) for r in rows] == \
        [(m, p, b) for m in modes for p, b in (("prefill", 1), ("decode", 1), ("decode", 2))]
    for r in rows:
        assert all(k in r for k in bench_e2e.REQUIRED_ROW_KEYS)
        assert not r.get("error"), r
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"])
        assert r["peak_mem_bytes"] is None     # CPU
        assert r["weight_bytes"] > 0
        assert r["decoder_weight_bytes"] + r["embed_head_bytes"] == r["weight_bytes"]
    wb = {r["mode"]: r["weight_bytes"] for r in rows}
    assert wb["w4a4-o1-salient"] < wb["bf16"]                        # int4 weights are smaller
    dec = {r["mode"]: r["decoder_weight_bytes"] for r in rows}
    head = {r["mode"]: r["embed_head_bytes"] for r in rows}
    assert dec["w4a4-o1-salient"] < 0.5 * dec["bf16"] and head["w4a4-o1-salient"] == head["bf16"]
    assert json.loads(path.read_text()) == rows
    saved = json.loads((tmp_path / "e2e_cpu.meta.json").read_text())
    for k in ("device_name", "torch", "triton", "transformers"):
        assert saved[k] == meta[k] and k in saved
    table = report.e2e_table(rows, saved, "results/e2e_cpu.json")
    assert f"Device: {saved['device_name']}" in table
    assert "| tiny | w4a4-o1-salient | decode | 2 |" in table


def test_cli_smoke_and_errors(tmp_path, capsys):
    path = tmp_path / "out" / "e2e.json"
    rc = bench_e2e.main(["--smoke", "--modes", "bf16,w4a16-g128", "--batches", "1",
                         "--prompt-len", "8", "--new-tokens", "2", "--json", str(path)])
    assert rc == 0
    rows = json.loads(path.read_text())
    assert {r["mode"] for r in rows} == {"bf16", "w4a16-g128"}
    assert all(r["model"] == "tiny" for r in rows)
    assert "| tiny | w4a16-g128 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_e2e.main(["--modes", "w2a2"])
    with pytest.raises(SystemExit):
        bench_e2e.main(["--batches", "0"])
    with pytest.raises(SystemExit):
        bench_e2e.main(["--dtype", "bfloat16"])       # --dtype is fp16 | bf16 | fp32 everywhere
    with pytest.raises(ValueError, match="subset"):
        bench_e2e.run_e2e(["tiny"], [], device="cpu")
    with pytest.raises(ValueError, match="prompt_len"):
        bench_e2e.run_e2e(["tiny"], ["bf16"], prompt_len=0, device="cpu")
    with pytest.raises(ValueError, match="batch"):
        bench_e2e.run_e2e(["tiny"], ["bf16"], batches=(), device="cpu")


def test_setup_defaults():
    """GPU runs default to static cache + compile (what serving runs); smoke runs to eager;
    the three setups exclude each other."""
    a = bench_e2e.parse_args(["--smoke"])
    assert not a.compile and not a.static_cache and a.batch_list == [1, 2]
    b = bench_e2e.parse_args(["--smoke", "--compile"])
    assert b.compile and b.static_cache
    assert bench_e2e.parse_args(["--smoke", "--static-cache"]).static_cache
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(["--eager", "--compile"])
