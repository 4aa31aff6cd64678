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


def _resign(d, *, checksum: bool = True):
    """Make the files of `d` consistent with its (edited) quant_config.json again: the header's
    quant_config_sha256 (dropped with ``checksum=False``: a file of the format before it) and
    the JSON's record of model.safetensors. What a buggy writer would leave, so that the checks
    behind the checksums are reached."""
    from safetensors.torch import load_file, save_file

    from mixq.io import META_SHA_KEY, _meta_sha256, sha256_file
    meta = json.loads((d / CONFIG_NAME).read_text())
    tensors = load_file(str(d / WEIGHTS_NAME))
    header = {"format": "mixq", **({META_SHA_KEY: _meta_sha256(meta)} if checksum else {})}
    save_file(tensors, str(d / WEIGHTS_NAME), metadata=header)
    meta["safetensors"].update(bytes=(d / WEIGHTS_NAME).stat().st_size,
                               sha256=sha256_file(d / WEIGHTS_NAME))
    (d / CONFIG_NAME).write_text(json.dumps(meta))
    return d


def _edit_meta(path, tmp_path, fn, *, resign: bool = True):
    """A copy of the save with `fn` applied to its JSON; re-signed (`_resign`) by default."""
    d = _copy(path, tmp_path)
    meta = json.loads((d / CONFIG_NAME).read_text())
    fn(meta)
    (d / CONFIG_NAME).write_text(json.dumps(meta))
    return _resign(d) if resign else d


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
    """The save in the previous formats: W4A4 modules hold `pack_int4` codes and no
    ``weight_layout``, int4 modules list ``w_q`` as a buffer (and, with `store_w_q`, the
    oldest also stored it), a CUDA-run W4A4 listed its ``w_kernel`` cache."""
    from safetensors.torch import load_file, save_file

    from mixq.io import sha256_file
    d = _copy(path, tmp_path)
    meta = json.loads((d / CONFIG_NAME).read_text())
    tensors = load_file(str(d / WEIGHTS_NAME))
    int4 = [n for n, e in meta["modules"].items() if e["buffers"].get("w_packed")]
    for i, name in enumerate(int4):
        e = meta["modules"][name]
        if e["class"] == "W4A4Linear":              # the layout before the blocked one
            e["attrs"].pop("weight_layout")
            kp = e["attrs"]["k_padded"]
            codes = quant.unpack_int4_blocked(tensors[f"{name}.w_packed"], kp, 128)
            tensors[f"{name}.w_packed"] = quant.pack_int4(codes)
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
    """After loading, every int4 layer holds exactly its stored bytes (no int8 codes), plus
    for a W4A4 layer with outliers its int32 gather index (K entries, built at load)."""
    from mixq import nn as qnn
    _model, path = saved
    loaded = load_quantized(path)
    int4 = [m for m in loaded.modules() if isinstance(m, (qnn.W4A4Linear, qnn.W4A16Linear))]
    assert int4
    for m in int4:
        stored = sum(t.numel() * t.element_size() for t in m.state_dict().values())
        index = 4 * m.in_features if getattr(m, "n_outliers", 0) else 0
        assert qnn.module_memory_bytes(m) == stored + index


# ------------------------------------------------------------------------------- user data is kept
def _files(d):
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def _same_tensors(a, b) -> bool:
    """Same tensors and header metadata (safetensors writes the metadata keys in no fixed
    order, so two saves of one model need not be equal byte for byte)."""
    from safetensors import safe_open
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        return (fa.metadata() == fb.metadata() and set(fa.keys()) == set(fb.keys())
                and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()))


def test_save_refuses_to_overwrite_a_checkpoint(saved, stories_dir, tmp_path, seed):
    """Saving into the float model's own folder (or over an earlier save) is refused unless
    ``overwrite=True``; nothing in the folder changes, no temporary file is left."""
    model, path = saved
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in stories_dir.iterdir():
        if f.is_file():
            (hf / f.name).write_bytes(f.read_bytes())
    before = _files(hf)
    with pytest.raises(FileExistsError, match=r"already holds model\.safetensors.*overwrite=True"):
        save_quantized(model, hf)
    assert _files(hf) == before
    again = _copy(path, tmp_path)
    before = _files(again)
    with pytest.raises(FileExistsError, match="model.safetensors and quant_config.json"):
        save_quantized(model, again)
    (again / WEIGHTS_NAME).unlink()               # a half checkpoint is still refused
    with pytest.raises(FileExistsError, match="quant_config.json"):
        save_quantized(model, again)
    with pytest.raises(TypeError, match="overwrite"):
        save_quantized(model, again, overwrite="yes")
    save_quantized(model, again, overwrite=True)
    assert set(_files(again)) == set(before)      # the same model: the same contents
    old, new = (json.loads(f[CONFIG_NAME]) for f in (before, _files(again)))
    assert {**old, "safetensors": None} == {**new, "safetensors": None}
    assert _same_tensors(again / WEIGHTS_NAME, path / WEIGHTS_NAME)
    ids = torch.randint(0, 512, (1, 11))
    assert torch.equal(_logits(load_quantized(again), ids), _logits(model, ids))
    with pytest.raises(FileExistsError, match="not a directory"):
        save_quantized(model, again / WEIGHTS_NAME, overwrite=True)


@pytest.mark.parametrize("where", ["weights", "json"])
def test_failed_save_keeps_the_old_checkpoint(saved, tmp_path, monkeypatch, where):
    """A save that fails part-way (here: the disk fills while writing) leaves the existing
    checkpoint byte for byte and no temporary files, also with overwrite=True."""
    import mixq.io as mio
    import safetensors.torch as st

    model, path = saved
    d = _copy(path, tmp_path)
    before = _files(d)
    if where == "weights":
        real = st.save_file

        def save_file(tensors, filename, metadata=None):
            real({k: tensors[k] for k in list(tensors)[:3]}, filename, metadata=metadata)
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(st, "save_file", save_file)
    else:
        real_dumps = json.dumps

        def dumps(obj, **kw):
            if kw.get("indent") == 1:
                raise OSError(28, "No space left on device")
            return real_dumps(obj, **kw)
        monkeypatch.setattr(mio.json, "dumps", dumps)
    with pytest.raises(OSError, match="No space"):
        save_quantized(model, d, overwrite=True)
    monkeypatch.undo()
    assert _files(d) == before
    load_quantized(d)


@pytest.mark.parametrize("keys, value", [
    (("modules", "model.layers.0.self_attn.q_proj", "attrs", "act_bits"), 8),
    (("modules", "model.layers.0.self_attn.q_proj", "attrs", "n_outliers"), 3),
    (("dtype",), "float16"),
    (("model_config", "rms_norm_eps"), 1e-3),
    (("quant_config", "kv_cache"), {"bits": 8, "group_size": 32}),
], ids=["act_bits", "n_outliers", "dtype", "rms_norm_eps", "kv_cache"])
def test_edited_json_is_refused(saved, tmp_path, keys, value):
    """Each of these edits loaded and gave other logits (or another cache) before: the header
    of model.safetensors now records the sha256 of the JSON."""
    _model, path = saved

    def edit(meta):
        for key in keys[:-1]:
            meta = meta[key]
        meta[keys[-1]] = value
    with pytest.raises(ValueError, match="quant_config_sha256.*edited or corrupted"):
        load_quantized(_edit_meta(path, tmp_path, edit, resign=False))


Q = "model.layers.0.self_attn.q_proj"        # W4A4, K = 64, 4 outliers, g128: Kq 60, Kp 128
D8 = "model.layers.1.mlp.down_proj"          # W8A8 (the 8-bit override)


@pytest.mark.parametrize("module, attr, value, match", [
    (Q, "n_outliers", 3, "n_outliers|k_regular"),
    (Q, "k_regular", 59, "k_regular"),
    (Q, "k_padded", 64, "k_padded"),
    (Q, "act_bits", 9, "act_bits"),
    (Q, "act_bits", True, "act_bits"),
    (Q, "weight_spec", {"__quantspec__": {"bits": 4, "symmetric": True, "granularity": "group",
                                          "group_size": 32, "tile": [8, 8]}}, "k_padded"),
    (Q, "weight_spec", {"__quantspec__": {"bits": 4, "symmetric": False, "granularity": "group",
                                          "group_size": 128, "tile": [8, 8]}}, "symmetric"),
    (Q, "weight_spec", {"__quantspec__": {"bits": 4, "symmetric": True, "granularity": "row",
                                          "group_size": 128, "tile": [8, 8]}}, "k_padded"),
    (Q, "out_features", 32, "w_packed|shape|->"),
    (Q, "colour", "red", "attributes"),
    (D8, "weight_spec", {"__quantspec__": {"bits": 4, "symmetric": True, "granularity": "row",
                                           "group_size": 128, "tile": [8, 8]}}, "int8-sym-row"),
], ids=["n_outliers", "k_regular", "k_padded", "act_bits_range", "act_bits_bool", "group_size",
        "asymmetric", "row", "out_features", "unknown_attr", "w8a8_spec"])
@pytest.mark.parametrize("checksum", [True, False], ids=["signed", "old_format"])
def test_module_attributes_checked_against_tensors(saved, tmp_path, module, attr, value, match,
                                                   checksum):
    """A JSON consistent with its checksum (or of the format before it) whose module attributes
    contradict the tensors is refused, naming the module."""
    _model, path = saved

    def edit(meta):
        meta["modules"][module]["attrs"][attr] = value
    d = _edit_meta(path, tmp_path, edit, resign=False)
    with pytest.raises(ValueError, match=match):
        load_quantized(_resign(d, checksum=checksum))


def test_outlier_indices_checked_against_perm(saved, tmp_path):
    """Tensors that contradict each other (a consistent file, other outlier channels than its
    permutation) are refused too."""
    from safetensors.torch import load_file, save_file
    _model, path = saved
    d = _copy(path, tmp_path)
    tensors = load_file(str(d / WEIGHTS_NAME))
    idx = tensors[f"{Q}.outlier_idx"]
    tensors[f"{Q}.outlier_idx"] = torch.sort((idx + 1) % 64).values
    save_file(tensors, str(d / WEIGHTS_NAME), metadata={"format": "mixq"})
    with pytest.raises(ValueError, match=f"{Q}.*outlier permutation"):
        load_quantized(_resign(d))


def test_old_format_dtype_edit_is_refused(saved, tmp_path):
    """Without the JSON checksum an edited "dtype" is still refused: it is recomputed from the
    float weights (it also sets the non-persistent buffers, e.g. RoPE's inv_freq)."""
    _model, path = saved

    def edit(meta):
        meta["dtype"] = "float16"
    with pytest.raises(ValueError, match="records dtype 'float16' but the float weights"):
        load_quantized(_resign(_edit_meta(path, tmp_path, edit, resign=False), checksum=False))


@pytest.mark.parametrize("fields", [{"rms_norm_eps": 1e-3}, {"rope_theta": 500.0},
                                    {"rms_norm_eps": 1e-3, "hidden_act": "gelu"}],
                         ids=["rms_norm_eps", "rope_theta", "two_fields"])
def test_model_factory_config_compared_whole(saved, stories_dir, fields):
    """Same shapes, another function: refused, naming every differing field."""
    _model, path = saved

    def factory():
        cfg = transformers.AutoConfig.from_pretrained(stories_dir)
        for k, v in fields.items():
            setattr(cfg, k, v)
            if k == "rope_theta":
                cfg.rope_parameters = {**cfg.rope_parameters, "rope_theta": v}
        return transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="does not match the saved model config") as err:
        load_quantized(path, model_factory=factory)
    for k in fields:
        assert f"{k}: saved" in str(err.value)
    assert "transformers_version" not in str(err.value)


def test_model_factory_with_quantized_head(float_llama, stories_dir, tmp_path, seed):
    """quantize_lm_head unties the head: the float factory's tie_word_embeddings=True is fine."""
    model = copy.deepcopy(float_llama)
    quantize(model, QuantConfig(quantize_lm_head=True), progress=False)
    assert model.config.tie_word_embeddings is False
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, model_factory=lambda: transformers.AutoModelForCausalLM
                            .from_pretrained(stories_dir, dtype=torch.float32))
    ids = torch.randint(0, 512, (1, 13))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
