"""mixq.io: save/load round trips (bit-exact logits) and every way a save directory can be bad."""
import copy
import hashlib
import json

import pytest
import torch

from mixq import quant
from mixq.api import quantize
from mixq.config import QuantConfig, QuantSpec
from mixq.io import CONFIG_NAME, WEIGHTS_NAME, load_quantized, save_quantized

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(float_llama, tmp_path_factory):
    """A W4A4 stories260k with outliers, an 8-bit override and a skipped layer, saved once."""
    model = copy.deepcopy(float_llama)
    calib = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(outlier_frac=0.05, skip=("model.layers.3.*",),
                      layer_overrides={"*.layers.1.mlp.down_proj": QuantSpec(8, True, "row")})
    quantize(model, cfg, calib, progress=False)
    out = tmp_path_factory.mktemp("q260")
    save_quantized(model, out)
    return model, out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_round_trip_bit_exact(saved, seed):
    model, path = saved
    loaded = load_quantized(path)
    ids = torch.randint(0, 512, (2, 37))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert loaded.mixq_config == model.mixq_config
    for (n1, m1), (n2, m2) in zip(model.named_modules(), loaded.named_modules()):
        assert n1 == n2 and type(m1) is type(m2)
        if hasattr(m1, "w_q"):
            assert torch.equal(m1.w_q, m2.w_q)
    g1 = model.generate(ids[:1, :3], max_new_tokens=5, do_sample=False)
    g2 = loaded.generate(ids[:1, :3], max_new_tokens=5, do_sample=False)
    assert torch.equal(g1, g2)


def test_file_contents(saved):
    from safetensors import safe_open
    _model, path = saved
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert meta["safetensors"]["sha256"] == hashlib.sha256(
        (path / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert meta["quant_config"]["outlier_frac"] == 0.05
    assert meta["model_config"]["model_type"] == "llama"
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.self_attn.q_proj.w_packed")
    assert "model.layers.0.self_attn.q_proj.w_q" not in keys           # only packed int4
    assert packed.dtype == torch.uint8 and packed.shape == (64, 64)    # Kp = 128 -> 64 bytes
    assert "model.layers.0.self_attn.q_proj.w_out" in keys
    assert "lm_head.weight" not in keys and meta["aliases"]["lm_head.weight"] == \
        "model.embed_tokens.weight"


def test_model_factory(saved, stories_dir, seed):
    model, path = saved
    factory = lambda: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
        stories_dir, dtype=torch.float32)
    loaded = load_quantized(path, model_factory=factory)
    ids = torch.randint(0, 512, (1, 21))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))

    def wrong():
        cfg = transformers.AutoConfig.from_pretrained(stories_dir)
        cfg.num_hidden_layers = 4
        return transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        load_quantized(path, model_factory=wrong)
    with pytest.raises(ValueError, match="nn.Module"):
        load_quantized(path, model_factory=lambda: None)


def _copy(path, tmp_path):
    dst = tmp_path / "copy"
    dst.mkdir(parents=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (dst / name).write_bytes((path / name).read_bytes())
    return dst


def test_missing_files(saved, tmp_path):
    _model, path = saved
    with pytest.raises(ValueError, match="not a directory"):
        load_quantized(tmp_path / "nowhere")
    d = _copy(path, tmp_path)
    (d / WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match="missing weights"):
        load_quantized(d)
    (d / CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match="missing"):
        load_quantized(d)


def test_corrupted_and_truncated(saved, tmp_path):
    _model, path = saved
    d = _copy(path, tmp_path)
    data = bytearray((d / WEIGHTS_NAME).read_bytes())
    data[len(data) // 2] ^= 0x10
    (d / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_quantized(d)
    (d / WEIGHTS_NAME).write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match="truncated"):
        load_quantized(d)
    (d / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_quantized(d)


def _edit_meta(path, tmp_path, fn):
    d = _copy(path, tmp_path)
    meta = json.loads((d / CONFIG_NAME).read_text())
    fn(meta)
    (d / CONFIG_NAME).write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize("keys, value, match", [
    (("model_config", "num_hidden_layers"), 4, "does not exist|unexpected"),      # fewer layers
    (("model_config", "intermediate_size"), 176, "shape|->"),                     # wider
    (("modules", "model.layers.0.mlp.up_proj", "class"), "W3A3Linear", "unknown class"),
    (("quant_config", "outlier_frac"), 3.0, "outlier_frac"),
    (("format",), "other", "not a mixq"),
], ids=["fewer_layers", "wider", "bad_class", "bad_quant_config", "not_mixq"])
def test_mismatched_config_and_shapes(saved, tmp_path, keys, value, match):
    _model, path = saved

    def edit(meta):
        for key in keys[:-1]:
            meta = meta[key]
        meta[keys[-1]] = value
    with pytest.raises(ValueError, match=match):
        load_quantized(_edit_meta(path, tmp_path, edit))


def test_save_needs_quantized_model(float_llama, tmp_path):
    with pytest.raises(ValueError, match="mixq.quantize"):
        save_quantized(float_llama, tmp_path)
    with pytest.raises(TypeError, match="nn.Module"):
        save_quantized("model", tmp_path)


def test_opt_fp16_and_rotation_round_trip(tmp_path, seed):
    cfg = transformers.OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, ffn_dim=40,
                                 num_attention_heads=4, max_position_embeddings=64,
                                 word_embed_proj_dim=32)
    model = transformers.OPTForCausalLM(cfg).eval().to(torch.float16)
    ids = torch.randint(0, 97, (2, 13))
    methods = pytest.importorskip("mixq.methods")
    quantize(model, QuantConfig(outlier_frac=0.1, methods=(methods.Rotation(),)), ids,
             progress=False)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float16
    assert type(loaded.model.decoder.layers[0].fc1).__name__ == "RotatedInputLinear"
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.parametrize("cfg", [
    QuantConfig(quantize_lm_head=True),                    # empty outlier_idx tensors, own head
    QuantConfig(mode="w4a16", w=QuantSpec(4, False, "group", 32)),
    QuantConfig(mode="w8a8"),
    QuantConfig(mode="fp16"),
    QuantConfig(w=QuantSpec(4, True, "tile", tile=(8, 8))),
], ids=lambda c: f"{c.mode}-{c.w.describe() if c.w else 'none'}-head{int(c.quantize_lm_head)}")
def test_round_trip_modes(float_llama, tmp_path, cfg, seed):
    model = copy.deepcopy(float_llama)
    quantize(model, cfg, progress=False)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    ids = torch.randint(0, 512, (1, 19))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert type(loaded.lm_head) is type(model.lm_head)


def _legacy_copy(path, tmp_path, store_w_q: bool, corrupt: bool = False):
    """The save in the previous formats: int4 modules list ``w_q`` as a buffer (and, with
    `store_w_q`, the oldest also stored it), a CUDA-run W4A4 listed its ``w_kernel`` cache."""
    from safetensors.torch import load_file, save_file

    from mixq.io import sha256_file
    d = _copy(path, tmp_path)
    meta = json.loads((d / CONFIG_NAME).read_text())
    tensors = load_file(str(d / WEIGHTS_NAME))
    int4 = [n for n, e in meta["modules"].items() if e["buffers"].get("w_packed")]
    for i, name in enumerate(int4):
        meta["modules"][name]["buffers"]["w_q"] = True
        meta["modules"][name]["buffers"]["w_kernel"] = True
        if store_w_q:
            e = meta["modules"][name]
            signed = e["attrs"]["weight_spec"]["__quantspec__"]["symmetric"]
            w_q = quant.unpack_int4(tensors[f"{name}.w_packed"], e["attrs"]["k_padded"],
                                    signed=signed)
            if corrupt and i == len(int4) // 2:
                w_q[0, 0] = 1 - w_q[0, 0]
            tensors[f"{name}.w_q"] = w_q
    save_file(tensors, str(d / WEIGHTS_NAME), metadata={"format": "mixq"})
    meta["safetensors"].update(bytes=(d / WEIGHTS_NAME).stat().st_size,
                               sha256=sha256_file(d / WEIGHTS_NAME))
    (d / CONFIG_NAME).write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize("store_w_q", [False, True], ids=["w_q_listed", "w_q_stored"])
def test_loads_previous_format(saved, tmp_path, seed, store_w_q):
    model, path = saved
    from mixq import nn as qnn
    loaded = load_quantized(_legacy_copy(path, tmp_path, store_w_q))
    for m in loaded.modules():                      # the int8 copy is no longer held
        if isinstance(m, (qnn.W4A4Linear, qnn.W4A16Linear)):
            assert "w_q" not in m._buffers and "w_kernel" not in m._buffers
    ids = torch.randint(0, 512, (1, 23))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_previous_format_with_wrong_w_q_is_corrupted(saved, tmp_path):
    _model, path = saved
    with pytest.raises(ValueError, match="corrupted"):
        load_quantized(_legacy_copy(path, tmp_path, True, corrupt=True))


def test_loaded_model_holds_packed_int4_only(saved):
    """After loading, every int4 layer holds exactly its stored bytes (no int8 codes)."""
    from mixq import nn as qnn
    _model, path = saved
    loaded = load_quantized(path)
    int4 = [m for m in loaded.modules() if isinstance(m, (qnn.W4A4Linear, qnn.W4A16Linear))]
    assert int4
    for m in int4:
        stored = sum(t.numel() * t.element_size() for t in m.state_dict().values())
        assert qnn.module_memory_bytes(m) == stored
