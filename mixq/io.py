"""Save and load a mixq-quantized model: one safetensors file + one JSON file, checked on load.

Layout of a saved directory::

    DIR/model.safetensors    every tensor of the model's state_dict: the quantized modules'
                             packed int4 weights (``w_packed``, uint8, two values per byte along
                             K), fp16 scales (+ zero points), outlier permutation/indices, fp16
                             outlier weight columns and biases, and all float tensors (embeddings,
                             norms, unquantized linears). The unpacked int8 ``w_q`` is not
                             stored: it is `quant.unpack_int4(w_packed)` (a save that has it
                             still loads; a copy that differs raises). Non-persistent caches
                             (``w_kernel``, ``w_q_cache``) are not saved. Tensors that share
                             memory (tied embeddings) are stored once.
    DIR/quant_config.json    {"format": "mixq", "mixq_version",
                              "quant_config" (QuantConfig.to_dict),
                              "model_config" (the HF config dict), "dtype" (of the float weights),
                              "modules": {name: class, attributes, buffer names},
                              "wrappers": {name: K, N} of RotatedInputLinear (online rotations),
                              "aliases": {name: stored name}, "safetensors": {file, bytes, sha256}}

`load_quantized` rebuilds the float architecture (from the saved HF config, or `model_factory`),
swaps in empty quantized modules with the saved attributes, loads every tensor strictly, then
re-applies what the saved QuantConfig turns on beyond the linears (quantized attention, fused
norms: `mixq.api.apply_full_architecture`; neither adds tensors, a fused norm keeps the norm's
state_dict keys): the logits equal those of the saved model bit for bit (same tensors, same
code path). The KV cache spec travels in the config (`mixq.api.make_cache`). Any
missing file, size or sha256 mismatch (truncated / corrupted file), unknown module class,
config mismatch, missing/unexpected tensor or wrong shape raises ValueError.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from mixq import nn as qnn
from mixq import quant
from mixq.api import CONFIG_ATTR, apply_full_architecture
from mixq.config import QuantConfig, QuantSpec, _spec_from_dict, _spec_to_dict
from mixq.data import sha256_file
from mixq.hf.loading import is_mixq_checkpoint, load_hf_model
from mixq.nn import RotatedInputLinear

__all__ = ["save_quantized", "load_quantized", "load_model", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "quant_config.json"
FORMAT = "mixq"
_CLASSES = {c.__name__: c for c in (qnn.FP16Linear, qnn.W8A8Linear, qnn.W4A16Linear,
                                     qnn.W4A4Linear)}
#: Model config fields that must agree between the saved model and `model_factory`'s model.
_KEY_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
               "intermediate_size", "ffn_dim", "num_attention_heads", "num_key_value_heads")


def _version() -> str:
    import mixq
    return getattr(mixq, "__version__", "unknown")


# ------------------------------------------------------------------------------- module attributes
def _encode_attr(v):
    if isinstance(v, QuantSpec):
        return {"__quantspec__": _spec_to_dict(v)}
    if isinstance(v, torch.dtype):
        return {"__dtype__": str(v).removeprefix("torch.")}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"cannot serialise module attribute of type {type(v).__name__}")


def _decode_attr(v):
    if isinstance(v, dict) and set(v) == {"__quantspec__"}:
        return _spec_from_dict(v["__quantspec__"], "module weight_spec")
    if isinstance(v, dict) and set(v) == {"__dtype__"}:
        dt = getattr(torch, str(v["__dtype__"]), None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"unknown dtype {v['__dtype__']!r} in {CONFIG_NAME}")
        return dt
    return v


def _module_entry(m: qnn.QuantLinearBase) -> dict:
    """Class, plain attributes (everything ``from_linear`` set besides buffers) and buffer names."""
    attrs = {k: _encode_attr(v) for k, v in vars(m).items()
             if not k.startswith("_") and k != "training"}
    buffers = {k: (b is not None) for k, b in m._buffers.items()
               if k not in m._non_persistent_buffers_set}     # caches are rebuilt, not saved
    return {"class": type(m).__name__, "attrs": attrs, "buffers": buffers}


def _empty_module(name: str, entry: dict) -> qnn.QuantLinearBase:
    """An instance of the saved class with its attributes and no tensors yet (local adapter
    until mixq.nn offers a constructor from saved state)."""
    cls = _CLASSES.get(entry.get("class"))
    if cls is None:
        raise ValueError(f"{CONFIG_NAME}: module {name!r} has unknown class "
                         f"{entry.get('class')!r} (known: {sorted(_CLASSES)})")
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in entry.get("attrs", {}).items():
        setattr(m, k, _decode_attr(v))
    for k in ("in_features", "out_features"):
        if not isinstance(getattr(m, k, None), int):
            raise ValueError(f"{CONFIG_NAME}: module {name!r} lacks an int {k}")
    return m


# ------------------------------------------------------------------------------- save
def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `model` (quantized by `mixq.quantize`) to `directory` (created if needed).

    Args:
        model: a Hugging Face causal LM with ``model.mixq_config`` set by `mixq.quantize`.
        directory: output folder; existing files of the same names are overwritten.
    Returns:
        the directory as a Path.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = getattr(model, CONFIG_ATTR, None)
    if not isinstance(config, QuantConfig):
        raise ValueError("model has no mixq_config: quantize it with mixq.quantize first")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    modules = {n: _module_entry(m) for n, m in model.named_modules()
               if isinstance(m, qnn.QuantLinearBase)}
    wrappers = {n: {"in_features": m.in_features, "out_features": m.out_features}
                for n, m in model.named_modules() if isinstance(m, RotatedInputLinear)}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        if t is None:
            continue
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 t.dtype)
        if t.numel() and ident in by_storage:   # tied weights: store once, remember the alias
            aliases[key] = by_storage[ident]
            continue
        by_storage[ident] = key
        tensors[key] = t.detach().to("cpu").contiguous()
    weights = out / WEIGHTS_NAME
    save_file(tensors, str(weights), metadata={"format": FORMAT})
    float_dtype = next((t.dtype for k, t in tensors.items() if t.is_floating_point()
                        and k.split(".")[-1] == "weight" and k.rsplit(".", 1)[0] not in modules),
                       torch.float32)
    model_cfg = model.config.to_dict() if hasattr(model, "config") else {}
    meta = {"format": FORMAT, "mixq_version": _version(), "quant_config": config.to_dict(),
            "model_config": model_cfg, "dtype": str(float_dtype).removeprefix("torch."),
            "modules": modules, "wrappers": wrappers, "aliases": aliases,
            "safetensors": {"file": WEIGHTS_NAME, "bytes": weights.stat().st_size,
                            "sha256": sha256_file(weights)}}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    return out


# ------------------------------------------------------------------------------- load
def _read_meta(directory: Path) -> dict:
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory with a saved mixq model")
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise ValueError(f"missing {cfg_path}: not a mixq save directory")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    need = {"format", "quant_config", "model_config", "modules", "safetensors", "dtype"}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not need <= set(meta):
        raise ValueError(f"{cfg_path} is not a mixq quant_config.json (needs keys {sorted(need)})")
    return meta


def _check_file(directory: Path, info: dict) -> Path:
    path = directory / str(info.get("file", WEIGHTS_NAME))
    if not path.is_file():
        raise ValueError(f"missing weights file {path}")
    size = path.stat().st_size
    if size != info.get("bytes"):
        raise ValueError(f"{path} has {size} bytes but {CONFIG_NAME} records {info.get('bytes')}: "
                         "truncated or replaced file")
    digest = sha256_file(path)
    if digest != info.get("sha256"):
        raise ValueError(f"{path} sha256 {digest} does not match {CONFIG_NAME} "
                         f"({info.get('sha256')}): corrupted file")
    return path


def _default_factory(model_cfg: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(model_cfg)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ValueError(f"{CONFIG_NAME}: model_config has no model_type; pass model_factory")
    for k in ("transformers_version", "architectures", "_name_or_path", "_attn_implementation"):
        cfg.pop(k, None)
    hf_cfg = AutoConfig.for_model(model_type, **cfg)
    return AutoModelForCausalLM.from_config(hf_cfg)


def _check_model_config(model: nn.Module, saved: dict) -> None:
    have = model.config.to_dict() if hasattr(model, "config") else {}
    bad = [f"{k}: saved {saved.get(k)!r}, model {have.get(k)!r}" for k in _KEY_FIELDS
           if k in saved and saved.get(k) != have.get(k)]
    if bad:
        raise ValueError("model_factory's model does not match the saved config: " + "; ".join(bad))


def _check_legacy_w_q(path: Path, name: str, m: qnn.QuantLinearBase,
                      tensors: dict[str, torch.Tensor]) -> None:
    """Older saves listed an int4 module's unpacked int8 ``w_q`` (N, Kp) as a buffer, and the
    oldest also stored it. It is derived from ``w_packed`` now: drop it, after checking that a
    stored copy equals ``unpack_int4(w_packed)`` (else the file is corrupted)."""
    w_q = tensors.pop(f"{name}.w_q", None)
    if w_q is None:
        return
    packed = tensors.get(f"{name}.w_packed")
    if packed is None:
        raise ValueError(f"{path} lacks {name}.w_packed (it has only the int8 {name}.w_q)")
    signed = bool(getattr(m, "weight_spec", QuantSpec()).symmetric)
    try:
        want = quant.unpack_int4(packed, int(m.k_padded), signed=signed)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {name}.w_packed cannot be unpacked: {e}") from None
    if w_q.shape != want.shape or not torch.equal(w_q.to(want.device, torch.int8), want):
        raise ValueError(f"{path}: {name}.w_q does not equal unpack_int4({name}.w_packed): "
                         "corrupted file")


def load_quantized(directory: str | os.PathLike, *, model_factory=None,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by `save_quantized`.

    Args:
        directory: the folder with model.safetensors and quant_config.json.
        model_factory: None (build the architecture from the saved HF config with random
            weights; every tensor is then overwritten) or a no-argument callable returning the
            float model of the same architecture (e.g. ``lambda: from_pretrained(path)``).
        device: where the loaded tensors go.
    Returns:
        the quantized model in eval mode, with ``mixq_config`` set and the config's quantized
        attention / fused norms switched on (`mixq.api.apply_full_architecture`).
    Raises:
        ValueError: missing/corrupted/truncated file, bad JSON, unknown module class, config or
            tensor-shape mismatch, missing or unexpected tensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = _read_meta(directory)
    qconfig = QuantConfig.from_dict(meta["quant_config"])
    path = _check_file(directory, meta["safetensors"])
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} cannot be read as safetensors: {e}") from None
    dtype = _decode_attr({"__dtype__": meta["dtype"]})
    model = model_factory() if model_factory is not None else _default_factory(meta["model_config"])
    if not isinstance(model, nn.Module):
        raise ValueError(f"model_factory must return an nn.Module, got {type(model).__name__}")
    _check_model_config(model, meta["model_config"])
    model.to(device=device, dtype=dtype)
    for name in sorted(meta.get("wrappers", {})):          # online input rotations
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"saved module {name!r} does not exist in the model") from None
        k = getattr(old, "in_features", None)
        if not isinstance(k, int):
            raise ValueError(f"saved rotated module {name!r} replaces a "
                             f"{type(old).__name__} without in_features")
        model.set_submodule(name, RotatedInputLinear(old, torch.eye(k, device=device)))
    for alias, src in meta.get("aliases", {}).items():
        if src not in tensors:
            raise ValueError(f"alias {alias!r} points to missing tensor {src!r}")
        tensors[alias] = tensors[src]
    for name, entry in meta["modules"].items():
        m = _empty_module(name, entry)
        for buf, present in entry.get("buffers", {}).items():
            key = f"{name}.{buf}"
            if buf in qnn.DERIVED_BUFFERS:            # a cache listed by an older save
                tensors.pop(key, None)
            elif buf == "w_q" and isinstance(m, (qnn.W4A4Linear, qnn.W4A16Linear)):
                _check_legacy_w_q(path, name, m, tensors)
            elif not present:
                m.register_buffer(buf, None)
            else:
                if key not in tensors:
                    raise ValueError(f"{path} lacks tensor {key!r}")
                m.register_buffer(buf, tensors[key])
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"saved module {name!r} does not exist in the model") from None
        if (getattr(old, "in_features", None), getattr(old, "out_features", None)) != \
                (m.in_features, m.out_features):
            raise ValueError(f"saved module {name!r} is {m.in_features}->{m.out_features} but the "
                             f"model's is {getattr(old, 'in_features', None)}->"
                             f"{getattr(old, 'out_features', None)}")
        model.set_submodule(name, m)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"tensors do not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    shapes = [f"{k}: file {tuple(tensors[k].shape)}, model {tuple(v.shape)}"
              for k, v in expected.items() if tuple(v.shape) != tuple(tensors[k].shape)]
    if shapes:
        raise ValueError("tensor shapes do not match the model: " + "; ".join(shapes[:5]))
    model.load_state_dict(tensors, strict=True)
    setattr(model, CONFIG_ATTR, qconfig)
    model.eval()
    apply_full_architecture(model, qconfig)
    return model


def load_model(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` by short name ("smollm2", "stories260k"), HF id/path, or a
    directory written by `save_quantized`.

    Args:
        name_or_path: a mixq checkpoint directory (loaded with `load_quantized`; its dtypes are
            restored as saved, `dtype` is ignored), or anything `mixq.hf.loading.load_hf_model`
            takes.
        dtype: float dtype of a float model.
        device: where the model goes.
    Returns:
        (model in eval mode, tokenizer). A checkpoint without tokenizer files gives tokenizer
        None.
    """
    if not is_mixq_checkpoint(name_or_path):
        return load_hf_model(name_or_path, dtype=dtype, device=device)
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    model = load_quantized(path, device=device)
    tok = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(path)
    return model, tok
