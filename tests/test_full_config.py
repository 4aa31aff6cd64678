"""The full-architecture part of QuantConfig (attention, kv_cache, fuse_norm): validation,
serialization, `mixq.quantize` / `make_cache` / generate, and save/load round trips."""
import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch

from mixq.api import apply_full_architecture, make_cache, quantize
from mixq.config import KVCacheSpec, QuantConfig, QuantSpec
from mixq.io import CONFIG_NAME, load_quantized, save_quantized

transformers = pytest.importorskip("transformers")
from mixq.config import FLOAT_ATTENTION, AttentionQuantConfig  # noqa: E402
from mixq.hf.attention import disable_quantized_attention, enable_quantized_attention  # noqa: E402
from mixq.hf.kv_cache import KV4Cache  # noqa: E402
from mixq.nn import QuantNorm  # noqa: E402

ATTN = AttentionQuantConfig(q_bits=8, k_bits=4, v_bits=8, p_bits=8)
NEW_KEYS = ("attention", "kv_cache", "fuse_norm")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _calib():
    return torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, err, match", [
    (dict(bits=3), ValueError, "bits must be one of"),
    (dict(bits=16), ValueError, "bits must be one of"),
    (dict(bits="4"), TypeError, "bits must be an int"),
    (dict(bits=True), TypeError, "bits must be an int"),
    (dict(bits=4.0), TypeError, "bits must be an int"),
    (dict(group_size=0), ValueError, "group_size"),
    (dict(group_size=2.5), TypeError, "group_size"),
])
def test_kv_cache_spec_rejects(kwargs, err, match):
    with pytest.raises(err, match=match):
        KVCacheSpec(**kwargs)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(attention={"q_bits": 8}), TypeError, "AttentionQuantConfig"),
    (dict(attention=8), TypeError, "AttentionQuantConfig"),
    (dict(kv_cache={"bits": 4}), TypeError, "KVCacheSpec"),
    (dict(kv_cache=4), TypeError, "KVCacheSpec"),
    (dict(fuse_norm=1), TypeError, "fuse_norm must be a bool"),
    (dict(fuse_norm=True, mode="w4a16"), ValueError, "w4a4"),
    (dict(fuse_norm=True, mode="w8a8"), ValueError, "w4a4"),
    (dict(fuse_norm=True, w=QuantSpec(4, True, "tile", tile=(8, 8))), ValueError, "kernel path"),
    (dict(fuse_norm=True, a=QuantSpec(8, True, "row")), ValueError, "kernel path"),
])
def test_config_full_rejects(kwargs, err, match):
    with pytest.raises(err, match=match):
        QuantConfig(**kwargs)


def test_config_full_dict_round_trip():
    c = QuantConfig(outlier_frac=0.02, attention=ATTN, kv_cache=KVCacheSpec(8, 16),
                    fuse_norm=True)
    d = json.loads(json.dumps(c.to_dict()))
    assert d["attention"] == {"q_bits": 8, "k_bits": 4, "v_bits": 8, "p_bits": 8,
                              "use_kernels": None}
    assert d["kv_cache"] == {"bits": 8, "group_size": 16} and d["fuse_norm"] is True
    back = QuantConfig.from_dict(d)
    assert back == c and isinstance(back.attention, AttentionQuantConfig)
    # attention / kv_cache / fuse_norm off, and the defaults of files written before them
    plain = QuantConfig()
    assert QuantConfig.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain
    old = {k: v for k, v in plain.to_dict().items() if k not in NEW_KEYS}
    assert QuantConfig.from_dict(old) == plain
    assert (plain.attention, plain.kv_cache, plain.fuse_norm) == (None, None, False)


@pytest.mark.parametrize("key, value, match", [
    ("attention", {"q_bits": 8, "colour": 1}, "unknown keys"),
    ("attention", {"q_bits": 5}, "q_bits"),
    ("attention", {"q_bits": "8"}, "q_bits"),
    ("attention", [8, 8, 8, 8], "dict"),
    ("kv_cache", {"bits": 3}, "bits"),
    ("kv_cache", {"bits": 4, "group": 32}, "unknown keys"),
    ("kv_cache", {"bits": "4"}, "bits"),
    ("kv_cache", 4, "dict"),
    ("fuse_norm", "yes", "fuse_norm"),
])
def test_config_full_from_dict_rejects(key, value, match):
    d = {**QuantConfig().to_dict(), key: value}
    with pytest.raises((ValueError, TypeError), match=match):
        QuantConfig.from_dict(d)


def test_import_mixq_stays_light():
    code = ("import sys, mixq; from mixq.config import KVCacheSpec, QuantConfig; "
            "c = QuantConfig(kv_cache=KVCacheSpec(), fuse_norm=True); "
            "QuantConfig.from_dict(c.to_dict()); "
            "heavy = [m for m in ('torch', 'triton', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------- quantize
def test_quantize_attention_and_kv_cache_generate(llama, float_llama, seed):
    cfg = QuantConfig(attention=ATTN, kv_cache=KVCacheSpec(bits=4, group_size=8))
    quantize(llama, cfg, progress=False)
    assert llama.config._attn_implementation == "mixq"
    attn = [m for m in llama.modules() if hasattr(m, "mixq_attention_config")]
    assert len(attn) == llama.config.num_hidden_layers
    assert all(m.mixq_attention_config == ATTN for m in attn)
    assert not hasattr(llama, "mixq_fused_norms")

    # the switch takes effect: linears alone (float attention) give other logits, mixq
    # attention without rounding gives them up to fp32 rounding, and switching attention off
    # again gives exactly them
    plain = quantize(copy.deepcopy(float_llama), QuantConfig(), progress=False)
    ids = torch.randint(0, 512, (2, 23))
    ref = _logits(plain, ids)
    assert not torch.equal(_logits(llama, ids), ref)
    unrounded = enable_quantized_attention(copy.deepcopy(plain), FLOAT_ATTENTION)
    torch.testing.assert_close(_logits(unrounded, ids), ref)

    prompt = ids[:1, :5]
    cache = make_cache(llama)
    assert isinstance(cache, KV4Cache) and (cache.bits, cache.group_size) == (4, 8)
    assert len(cache.layers) == llama.config.num_hidden_layers
    out = llama.generate(prompt, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 17) and torch.equal(out[:, :5], prompt)
    assert cache.get_seq_length() == 16 and cache.kv_bytes() > 0
    assert make_cache(llama) is not cache                       # a fresh cache per call

    disable_quantized_attention(llama)
    assert torch.equal(_logits(llama, ids), ref)


def test_make_cache_none_and_errors(llama, float_llama):
    with pytest.raises(ValueError, match="mixq.quantize"):
        make_cache(float_llama)
    quantize(llama, QuantConfig(), progress=False)
    assert make_cache(llama) is None
    assert llama.config._attn_implementation != "mixq"
    with pytest.raises(TypeError, match="check_finite"):
        make_cache(llama, check_finite=None)
    cache = make_cache(llama, kv_cache=KVCacheSpec(bits=8, group_size=4))   # another spec
    assert isinstance(cache, KV4Cache) and (cache.bits, cache.group_size) == (8, 4)
    with pytest.raises(TypeError, match="KVCacheSpec"):
        make_cache(llama, kv_cache={"bits": 4})
    with pytest.raises(TypeError, match="QuantConfig"):
        apply_full_architecture(llama, {"attention": None})


def test_salient_weight_outliers_are_shared_by_a_group_so_its_norm_fuses(llama):
    # q/k/v (gate/up) read one input: the channels are ranked over the group's stacked weight
    from mixq.outliers import salient_weight_channels
    attn = llama.model.layers[0].self_attn
    stacked = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).float()
    want = salient_weight_channels(stacked.detach().cpu(), 0.05, "max")
    cfg = QuantConfig(outlier_frac=0.05, outlier_strategy="max", fuse_norm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # every norm fuses: no warning
        quantize(llama, cfg, progress=False)
    attn = llama.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(attn, name).outlier_idx.cpu(), want)
    assert all(v.startswith("fused") for v in llama.mixq_fused_norms.values())


def test_fuse_norm_warns_when_nothing_fuses(llama):
    # rotation folds each norm into its readers (an online x @ Q): no norm output to quantize
    from mixq.methods import Rotation
    cfg = QuantConfig(outlier_frac=0.05, methods=(Rotation(),), fuse_norm=True)
    with pytest.warns(UserWarning, match="no norm could be fused"):
        quantize(llama, cfg, _calib(), progress=False)
    assert all(v.startswith("skipped") for v in llama.mixq_fused_norms.values())


# ------------------------------------------------------------------------------- save / load
@pytest.fixture(scope="module")
def saved_full(float_llama, tmp_path_factory):
    """stories260k: W4A4 (calibrated outliers) + quantized attention + KV4 spec + fused norms."""
    model = copy.deepcopy(float_llama)
    cfg = QuantConfig(outlier_frac=0.05, attention=ATTN, kv_cache=KVCacheSpec(4, 8),
                      fuse_norm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # every norm fuses: no warning
        quantize(model, cfg, _calib(), progress=False)
    out = tmp_path_factory.mktemp("q260full")
    save_quantized(model, out)
    return model, out


def test_fused_norms_change_nothing(saved_full, float_llama, seed):
    model, _ = saved_full
    n_norms = 2 * model.config.num_hidden_layers
    assert len(model.mixq_fused_norms) == n_norms
    assert all(v.startswith("fused") for v in model.mixq_fused_norms.values())
    assert sum(isinstance(m, QuantNorm) for m in model.modules()) == n_norms
    report = dict(model.mixq_fused_norms)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_full_architecture(model, model.mixq_config)        # idempotent
    assert model.mixq_fused_norms == report
    assert sum(isinstance(m, QuantNorm) for m in model.modules()) == n_norms
    cfg = QuantConfig.from_dict({**model.mixq_config.to_dict(), "fuse_norm": False})
    unfused = quantize(copy.deepcopy(float_llama), cfg, _calib(), progress=False)
    ids = torch.randint(0, 512, (2, 19))
    assert torch.equal(_logits(model, ids), _logits(unfused, ids))


def test_full_round_trip_bit_exact(saved_full, seed):
    model, path = saved_full
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert meta["quant_config"]["attention"]["k_bits"] == 4
    assert meta["quant_config"]["kv_cache"] == {"bits": 4, "group_size": 8}
    loaded = load_quantized(path)
    assert loaded.mixq_config == model.mixq_config
    assert loaded.config._attn_implementation == "mixq"
    assert all(m.mixq_attention_config == ATTN for m in loaded.modules()
               if hasattr(m, "layer_idx") and hasattr(m, "scaling"))
    assert loaded.mixq_fused_norms == model.mixq_fused_norms
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    ids = torch.randint(0, 512, (2, 37))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    prompt = ids[:1, :6]
    g1 = model.generate(prompt, max_new_tokens=10, do_sample=False,
                        past_key_values=make_cache(model))
    cache = make_cache(loaded)
    g2 = loaded.generate(prompt, max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert torch.equal(g1, g2) and isinstance(cache, KV4Cache) and cache.group_size == 8


def _old_format(meta, tmp_path):
    """Write `meta` with the weights as a save from before the JSON checksum: no
    quant_config_sha256 in the safetensors header (the JSON still records the file's sha256)."""
    from safetensors.torch import load_file, save_file

    from mixq.io import sha256_file
    weights = tmp_path / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "mixq"})
    meta["safetensors"].update(bytes=weights.stat().st_size, sha256=sha256_file(weights))
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))


def test_old_format_json_loads(saved_full, tmp_path, seed):
    """A quant_config.json written before attention / kv_cache / fuse_norm existed (and so
    before the JSON checksum)."""
    model, path = saved_full
    for name in (CONFIG_NAME, "model.safetensors"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    for k in NEW_KEYS:
        del meta["quant_config"][k]
    _old_format(meta, tmp_path)
    loaded = load_quantized(tmp_path)
    cfg = loaded.mixq_config
    assert (cfg.attention, cfg.kv_cache, cfg.fuse_norm) == (None, None, False)
    assert loaded.config._attn_implementation != "mixq" and make_cache(loaded) is None
    assert not any(isinstance(m, QuantNorm) for m in loaded.modules())
    # same weights; the float-attention logits equal those with attention switched off
    ids = torch.randint(0, 512, (1, 15))
    ref = copy.deepcopy(model)
    disable_quantized_attention(ref)
    assert torch.equal(_logits(loaded, ids), _logits(ref, ids))

    meta["quant_config"]["attention"] = {"p_bits": 3}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="p_bits"):
        load_quantized(tmp_path)


def test_opt_attention_round_trip(tiny_opt, tmp_path, seed):
    model = tiny_opt()
    ids = torch.randint(0, 97, (2, 13))
    cfg = QuantConfig(outlier_frac=0.1, attention=AttentionQuantConfig(p_bits=4),
                      kv_cache=KVCacheSpec(8, 4), fuse_norm=True)
    quantize(model, cfg, ids, progress=False)
    assert model.config._attn_implementation == "mixq"
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert loaded.config._attn_implementation == "mixq"
    assert loaded.mixq_fused_norms == model.mixq_fused_norms
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    g1 = model.generate(ids[:1, :3], max_new_tokens=6, do_sample=False,
                        past_key_values=make_cache(model))
    g2 = loaded.generate(ids[:1, :3], max_new_tokens=6, do_sample=False,
                         past_key_values=make_cache(loaded))
    assert torch.equal(g1, g2)
