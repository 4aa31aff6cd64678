"""mixq.experiments.full: the full-architecture W4A4 steps (presets with +kv4, +attn, +norm),
and the pieces of eval / calibrate they use."""
import pytest
import torch

from mixq.api import make_cache, quantize
from mixq.config import QuantConfig
from mixq.eval import perplexity
from mixq.experiments.full import (STEPS, float_kv_bytes, kv_cache_bytes, run_full,
                                   step_perplexities, step_presets)
from mixq.hf.kv_cache import KV4Cache
from mixq.presets import preset

PPL = dict(seqlen=64, max_windows=2, progress=False)


def test_step_presets_are_the_suffixed_names():
    assert step_presets("w4a4-rtn") == [("linear", "w4a4-rtn"), ("kv4", "w4a4-rtn+kv4"),
                                        ("attn", "w4a4-rtn+kv4+attn"),
                                        ("norm", "w4a4-rtn+kv4+attn+norm")]
    assert [s for s, _ in step_presets("w4a4-o1+rotation+gptq")] == list(STEPS)
    for bad in ("w4a3", "w4a4-rtn+kv4"):
        with pytest.raises(ValueError, match="unknown linear preset"):
            step_presets(bad)


def test_dequantized_reads_cache_returns_kv_even_when_asked_for_packed_reads(llama):
    quantize(llama, preset("w4a4-rtn+kv4"), progress=False)
    cache = make_cache(llama, check_finite=False, dequantized_reads=True)
    cache.packed_reads = True                       # what mixq attention's hook does
    assert cache.packed_reads is False
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        llama(input_ids=ids, past_key_values=cache, use_cache=True)
    k, v = cache.layers[0].dequantize()
    assert k.shape[-2] == ids.shape[1] and v.shape == k.shape


def test_perplexity_with_a_cache_factory(float_llama, tok):
    """A float cache changes nothing; a 4-bit cache changes the score (attention reads it)."""
    from transformers import DynamicCache
    plain = perplexity(float_llama, tok, **PPL)
    dyn = perplexity(float_llama, tok, cache_factory=DynamicCache, **PPL)
    assert dyn["ppl"] == pytest.approx(plain["ppl"], rel=1e-5)
    kv4 = perplexity(float_llama, tok, cache_factory=lambda: KV4Cache(
        float_llama.config, bits=4, group_size=8, dequantized_reads=True), **PPL)
    assert kv4["n_tokens"] == plain["n_tokens"] and kv4["ppl"] != plain["ppl"]


def test_kv_bytes(llama):
    c = llama.config
    head_dim = c.hidden_size // c.num_attention_heads
    assert float_kv_bytes(llama, 64) == 2 * c.num_hidden_layers * c.num_key_value_heads \
        * head_dim * 64 * 2
    quantize(llama, preset("w4a4-rtn+kv4"), progress=False)      # KV4: groups of 32 tokens
    kv4 = kv_cache_bytes(llama, 64)
    cache = KV4Cache(llama.config, bits=4, group_size=32)
    with torch.no_grad():
        llama(input_ids=torch.ones(1, 64, dtype=torch.long), past_key_values=cache)
    assert kv4 == cache.kv_bytes() and kv4 < float_kv_bytes(llama, 64)


def test_step_perplexities(llama, tok):
    quantize(llama, preset("w4a4-rtn"), progress=False)
    before = perplexity(llama, tok, **PPL)["ppl"]
    rows = step_perplexities(llama, tok, "w4a4-rtn", **PPL)
    assert [r["config"] for r in rows] == list(STEPS)
    assert [r["preset"] for r in rows] == [n for _, n in step_presets("w4a4-rtn")]
    assert rows[0]["ppl"] == pytest.approx(before, rel=1e-6)          # (a) is the input model
    assert all(r["ppl"] > 0 for r in rows[:3]) and rows[3]["ppl"] is None   # (d): CPU
    assert rows[1]["kv_bytes"] < rows[0]["kv_bytes"]
    assert llama.config._attn_implementation == "mixq"
    with pytest.raises(ValueError, match="unknown steps"):
        step_perplexities(llama, tok, "w4a4-rtn", steps=("linear", "kv2"), **PPL)


def test_step_perplexities_needs_the_linear_preset(llama, tok):
    quantize(llama, QuantConfig(mode="w4a4", outlier_frac=0.5, outlier_strategy="max"),
             progress=False)
    with pytest.raises(ValueError, match="quantized with the preset"):
        step_perplexities(llama, tok, "w4a4-rtn", **PPL)


def test_quantize_records_layer_errors(llama, tok):
    from mixq.calibrate import calibration_batches
    calib = calibration_batches(tok, n_samples=2, seqlen=32)
    quantize(llama, QuantConfig(mode="w4a4", outlier_frac=0.05), calib, progress=False)
    errs = llama.mixq_layer_errors
    assert [e["layer"] for e in errs] == list(range(llama.config.num_hidden_layers))
    assert all(0 < e["rel_err"] < 10 and e["update_norm"] > 0 for e in errs)


def test_run_full_writes_rows_and_meta(tmp_path, stories_dir):
    import json

    out = tmp_path / "full_tiny.json"
    rows, meta = run_full("stories260k", "w4a4-rtn", n_calib=2, calib_seqlen=64, max_windows=1,
                          device="cpu", json_path=out, progress=False)
    assert [r["config"] for r in rows] == ["fp16", *STEPS]
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    saved = json.loads(out.with_suffix(".meta.json").read_text())
    assert saved["linear_config"] == "w4a4-rtn" and saved["steps"] == list(STEPS)
    assert saved["presets"] == meta["presets"] == [n for _, n in step_presets("w4a4-rtn")]
    with pytest.raises(ValueError, match="unknown linear preset"):
        run_full("stories260k", "w4a3", json_path=None, progress=False)
