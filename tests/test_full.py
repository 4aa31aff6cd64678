"""mixq.full: the full-architecture W4A4 steps, and the pieces of eval / calibrate they use."""
import pytest
import torch

from mixq.api import quantize
from mixq.config import QuantConfig
from mixq.eval import perplexity
from mixq.full import (STEPS, FullW4A4Config, StoredKV4Cache, float_kv_bytes, kv4_bytes,
                       step_perplexities)
from mixq.hf.kv_cache import KV4Cache

PPL = dict(seqlen=64, max_windows=2, progress=False)


def test_stored_cache_returns_dequantized_kv_even_when_asked_for_packed_reads(float_llama):
    cache = StoredKV4Cache(float_llama.config, bits=4, group_size=8)
    cache.packed_reads = True                       # what mixq attention's hook does
    assert cache.packed_reads is False
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        float_llama(input_ids=ids, past_key_values=cache, use_cache=True)
    k, v = cache.layers[0].dequantize()
    assert k.shape[-2] == ids.shape[1] and v.shape == k.shape


def test_perplexity_with_a_cache_factory(float_llama, tok):
    """A float cache changes nothing; a 4-bit cache changes the score (attention reads it)."""
    from transformers import DynamicCache
    plain = perplexity(float_llama, tok, **PPL)
    dyn = perplexity(float_llama, tok, cache_factory=DynamicCache, **PPL)
    assert dyn["ppl"] == pytest.approx(plain["ppl"], rel=1e-5)
    kv4 = perplexity(float_llama, tok, cache_factory=lambda: StoredKV4Cache(
        float_llama.config, bits=4, group_size=8), **PPL)
    assert kv4["n_tokens"] == plain["n_tokens"] and kv4["ppl"] != plain["ppl"]


def test_kv_bytes(float_llama):
    c = float_llama.config
    head_dim = c.hidden_size // c.num_attention_heads
    assert float_kv_bytes(float_llama, 64) == 2 * c.num_hidden_layers * c.num_key_value_heads \
        * head_dim * 64 * 2
    cfg = FullW4A4Config(kv_bits=4, kv_group=32)
    kv4 = kv4_bytes(float_llama, 64, cfg)
    cache = KV4Cache(float_llama.config, bits=4, group_size=32)
    with torch.no_grad():
        float_llama(input_ids=torch.ones(1, 64, dtype=torch.long), past_key_values=cache)
    assert kv4 == cache.kv_bytes() and kv4 < float_kv_bytes(float_llama, 64)


def test_step_perplexities(llama, tok):
    quantize(llama, QuantConfig(mode="w4a4"), progress=False)
    before = perplexity(llama, tok, **PPL)["ppl"]
    rows = step_perplexities(llama, tok, **PPL)
    assert [r["config"] for r in rows] == list(STEPS)
    assert rows[0]["ppl"] == pytest.approx(before, rel=1e-6)          # (a) is the input model
    assert all(r["ppl"] > 0 for r in rows[:3]) and rows[3]["ppl"] is None   # (d): CPU
    assert rows[1]["kv_bytes"] < rows[0]["kv_bytes"]
    assert llama.config._attn_implementation == "mixq"
    with pytest.raises(ValueError, match="unknown steps"):
        step_perplexities(llama, tok, steps=("linear", "kv2"), **PPL)


def test_full_config_validation():
    with pytest.raises(ValueError, match="kv_bits"):
        FullW4A4Config(kv_bits=3)
    with pytest.raises(ValueError, match="kv_group"):
        FullW4A4Config(kv_group=0)
    with pytest.raises(TypeError, match="AttentionQuantConfig"):
        FullW4A4Config(attention={"q_bits": 8})


def test_quantize_records_layer_errors(llama, tok):
    from mixq.calibrate import calibration_batches
    calib = calibration_batches(tok, n_samples=2, seqlen=32)
    quantize(llama, QuantConfig(mode="w4a4", outlier_frac=0.05), calib, progress=False)
    errs = llama.mixq_layer_errors
    assert [e["layer"] for e in errs] == list(range(llama.config.num_hidden_layers))
    assert all(0 < e["rel_err"] < 10 and e["update_norm"] > 0 for e in errs)


def test_run_full_writes_rows_and_meta(tmp_path, stories_dir):
    import json

    from mixq.full import run_full
    out = tmp_path / "full_tiny.json"
    rows = run_full("stories260k", "w4a4-rtn", n_calib=2, calib_seqlen=64, max_windows=1,
                    device="cpu", json_path=out, progress=False)
    assert [r["config"] for r in rows] == ["fp16", *STEPS]
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["linear_config"] == "w4a4-rtn" and meta["steps"] == list(STEPS)
    with pytest.raises(ValueError, match="unknown linear config"):
        run_full("stories260k", "w4a3", json_path=None, progress=False)
