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
                             memory (tied embeddings) are stored once. Header metadata:
                             {"format": "mixq", "quant_config_sha256": sha256 of the canonical
                             JSON (`_meta_sha256`) of quant_config.json without its
                             "safetensors" entry}.
    DIR/quant_config.json    {"format": "mixq", "mixq_version",
                              "quant_config" (QuantConfig.to_dict),
                              "model_config" (the HF config dict), "dtype" (of the float weights),
                              "modules": {name: class, attributes, buffer names},
                              "wrappers": {name: K, N} of RotatedInputLinear (online rotations),
                              "aliases": {name: stored name}, "safetensors": {file, bytes, sha256}}

The two files cover each other: the JSON records the size and sha256 of the safetensors file,
whose header records the sha256 of the rest of the JSON, so an edit of either file (a module
attribute such as ``n_outliers`` / ``act_bits`` / ``dtype``, the QuantConfig, the model
config) is refused on load. `save_quantized` never replaces an existing checkpoint unless
asked (``overwrite=True``) and writes each file under a temporary name first, so a crash leaves
no truncated file under the real names.

`load_quantized` rebuilds the float architecture (from the saved HF config, or `model_factory`,
whose config must equal the saved one up to fields that do not change the function),
swaps in empty quantized modules with the saved attributes (each checked against its tensors:
`_check_module`), loads every tensor strictly (float tensors keep the dtype they were saved
in), then re-applies what the saved QuantConfig turns on beyond the linears (quantized
attention, fused norms: `mixq.api.apply_full_architecture`; neither adds tensors, a fused norm
keeps the norm's state_dict keys): the logits equal those of the saved model bit for bit (same
tensors, same code path). The KV cache spec travels in the config (`mixq.api.make_cache`).
Any missing file, size or sha256 mismatch (truncated / corrupted / edited file), unknown module
class, attribute that contradicts the tensors, config mismatch, missing/unexpected tensor or
wrong shape raises ValueError.

Files written before the JSON checksum existed (no ``quant_config_sha256`` in the header) still
load; for them only the safetensors file is covered, so what no tensor shows cannot be proven:
a W4A4 module's ``act_bits`` within 2..8, a weight spec's ``bits`` (<= 4) and other fields
of equal block layout, the QuantConfig fields beyond the module attributes (attention,
kv_cache, fuse_norm, methods) and model-config fields that no tensor shape reflects
(``rope_theta``, ``rms_norm_eps``, ...).
"""
from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

import torch
from torch import nn

from mixq import nn as qnn
from mixq import outliers as _outliers
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
#: Header metadata key of model.safetensors: sha256 of the canonical quant_config.json.
META_SHA_KEY = "quant_config_sha256"
#: Model config fields that do not change what the model computes: ignored when the saved config
#: is compared with `model_factory`'s (so are names starting with `_IGNORED_PREFIXES`, and
#: ``tie_word_embeddings`` when ``quantize_lm_head`` untied the head).
_IGNORED_CONFIG = frozenset({"transformers_version", "_name_or_path", "_commit_hash",
                             "architectures", "dtype", "torch_dtype", "use_cache",
                             "return_dict"})
_IGNORED_PREFIXES = ("_attn_implementation", "_experts_implementation", "output_")
#: Attributes each module class saves besides in_features / out_features (`_module_entry`);
#: ``use_kernels`` may be saved too (a runtime switch, set by hand).
_MODULE_ATTRS = {"FP16Linear": {"dtype"}, "W8A8Linear": {"weight_spec"},
                 "W4A16Linear": {"weight_spec", "k_padded"},
                 "W4A4Linear": {"weight_spec", "k_padded", "act_bits", "n_outliers", "k_regular",
                                "weight_layout"}}
#: attributes a file written before they existed may lack (`_upgrade_module` fills them in)
_LATER_ATTRS = {"W4A4Linear": {"weight_layout"}}


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


def _module_entries(model: nn.Module) -> dict[str, dict]:
    """{name: entry} of every quantized linear, in the unstacked layout: a stacked q/k/v or
    gate/up (`mixq.nn.StackedLinear`) is saved as its members (`StackedPart.as_linear`), whose
    tensors are what the parts' state_dict holds."""
    stacked = {id(m.fused) for m in model.modules() if isinstance(m, qnn.StackedLinear)}
    entries = {}
    for n, m in model.named_modules():
        if isinstance(m, qnn.StackedPart):
            entries[n] = _module_entry(m.as_linear())
        elif isinstance(m, qnn.QuantLinearBase) and id(m) not in stacked:
            entries[n] = _module_entry(m)
    return entries


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
        v = getattr(m, k, None)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{CONFIG_NAME}: module {name!r} lacks a positive int {k}")
    want = _MODULE_ATTRS[type(m).__name__] | {"in_features", "out_features"}
    have = set(entry.get("attrs", {}))
    if want - have - _LATER_ATTRS.get(type(m).__name__, set()) or have - want - {"use_kernels"}:
        raise ValueError(f"{CONFIG_NAME}: module {name!r} ({type(m).__name__}) has attributes "
                         f"{sorted(have)}, expected {sorted(want)}: edited or corrupted file")
    return m


def _check_module(name: str, m: qnn.QuantLinearBase) -> None:
    """The saved attributes of a quantized module against its tensors, before loading them.

    With K = in_features, N = out_features, spec = weight_spec, b = its block width along K
    (group size, tile width, else 1): FP16Linear ``weight`` (N, K) and ``bias`` in ``dtype``
    (float16 / bfloat16); W8A8Linear spec int8 symmetric "row", ``w_q`` int8 (N, K),
    ``w_scale`` fp16 (N, 1); int4 modules ``k_padded == ceil(Kq / b) * b`` (Kq = K, or
    ``k_regular`` for W4A4), ``w_packed`` uint8 (N, ceil(k_padded / 2)), ``w_scale`` fp16 of
    `quant.scale_shape` (Np, k_padded) (Np: N rounded up to the tile height), ``w_zero``
    exactly for asymmetric specs (shape of ``w_scale``); W4A4Linear a symmetric spec,
    ``act_bits`` in 2..8, ``n_outliers == outlier_idx.numel() == w_out.shape[1]`` < K,
    ``k_regular == K - n_outliers``, ``outlier_idx`` int64 ascending in [0, K) and ``perm`` int64
    (K,) equal to ``outliers.outlier_permutation(K, outlier_idx)``; ``bias`` (N,) or None. One
    pass over the small index tensors (load time only).

    Raises:
        ValueError: naming the module and the attribute or tensor that does not fit.
    """
    cls = type(m).__name__

    def fail(what: str):
        return ValueError(f"{CONFIG_NAME}: module {name!r} ({cls}) {what}: edited or corrupted "
                          "file")

    def tensor(buf: str, dtypes, shape) -> torch.Tensor:
        t = m._buffers.get(buf)
        if t is None:
            raise fail(f"has no tensor {buf}")
        dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
        if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
            raise fail(f"needs {buf} of shape {tuple(shape)} and dtype "
                       f"{'/'.join(str(d).removeprefix('torch.') for d in dtypes)}, the file "
                       f"has {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}")
        return t

    def int_attr(attr: str, lo: int, hi: int) -> int:
        v = getattr(m, attr, None)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise fail(f"has {attr}={v!r}, needs an int in [{lo}, {hi}]")
        return v

    k_in, n = m.in_features, m.out_features
    bias_dtype = torch.float16
    if isinstance(m, qnn.FP16Linear):
        if m.dtype not in (torch.float16, torch.bfloat16):
            raise fail(f"has dtype {m.dtype!r}, needs torch.float16 or torch.bfloat16")
        tensor("weight", m.dtype, (n, k_in))
        bias_dtype = m.dtype
    else:
        spec = getattr(m, "weight_spec", None)
        if not isinstance(spec, QuantSpec):
            raise fail(f"has weight_spec {spec!r}, needs a QuantSpec")
        if isinstance(m, qnn.W8A8Linear):
            if (spec.bits, spec.symmetric, spec.granularity) != (8, True, "row"):
                raise fail(f"has weight_spec {spec.describe()}, needs int8-sym-row")
            tensor("w_q", torch.int8, (n, k_in))
            tensor("w_scale", torch.float16, (n, 1))
        else:
            if spec.bits > 4 or (isinstance(m, qnn.W4A4Linear) and not spec.symmetric):
                raise fail(f"has weight_spec {spec.describe()}, needs "
                           f"{'symmetric ' if isinstance(m, qnn.W4A4Linear) else ''}bits <= 4")
            k_q = k_in
            if isinstance(m, qnn.W4A4Linear):
                int_attr("act_bits", 2, 8)
                n_out = int_attr("n_outliers", 0, k_in - 1)
                k_q = int_attr("k_regular", 1, k_in)
                if k_q != k_in - n_out:
                    raise fail(f"has k_regular={k_q} but in_features - n_outliers = "
                               f"{k_in - n_out}")
                idx = tensor("outlier_idx", torch.int64, (n_out,))
                perm = tensor("perm", torch.int64, (k_in,))
                tensor("w_out", torch.float16, (n, n_out))
                try:
                    want = _outliers.outlier_permutation(k_in, idx)
                except ValueError as e:
                    raise fail(f"has outlier_idx that {e}") from None
                if (n_out > 1 and not bool((idx[1:] > idx[:-1]).all())) or \
                        not torch.equal(perm, want.to(perm.device)):
                    raise fail("has perm / outlier_idx that are not the outlier permutation of "
                               "its ascending outlier channels")
            block = spec.block_cols
            kp = int_attr("k_padded", 1, 1 << 62)
            if kp != math.ceil(k_q / block) * block:
                raise fail(f"has k_padded={kp}, but {k_q} int4 columns in blocks of {block} "
                           f"({spec.describe()}) give {math.ceil(k_q / block) * block}")
            if isinstance(m, qnn.W4A4Linear):
                layout = getattr(m, "weight_layout", None)
                if layout != qnn.WEIGHT_LAYOUT_W4A4:
                    raise fail(f"has weight_layout={layout!r}, needs "
                               f"{qnn.WEIGHT_LAYOUT_W4A4!r}")
                tensor("w_packed", torch.uint8, (n, quant.blocked_columns(kp, qnn.W4A4_WEIGHT_BLOCK) // 2))
            else:
                tensor("w_packed", torch.uint8, (n, (kp + 1) // 2))
            rows = (math.ceil(n / spec.tile[0]) * spec.tile[0] if spec.granularity == "tile"
                    else n)
            scale = tensor("w_scale", torch.float16, quant.scale_shape((rows, kp), spec))
            zero = m._buffers.get("w_zero")
            if spec.symmetric and zero is not None:
                raise fail(f"has a w_zero but a symmetric weight_spec {spec.describe()}")
            if not spec.symmetric:
                tensor("w_zero", (torch.uint8, torch.int8), tuple(scale.shape))
    if m._buffers.get("bias") is not None:
        tensor("bias", bias_dtype, (n,))


# ------------------------------------------------------------------------------- save
def _meta_sha256(meta: dict) -> str:
    """sha256 of the canonical JSON of `meta` without its "safetensors" entry: `meta` as JSON
    reads it back (``default=str`` for other objects), ``sort_keys``, separators ``(",", ":")``,
    ASCII; what model.safetensors' header records as ``quant_config_sha256``."""
    import hashlib

    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != "safetensors"},
                                 default=str))
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _float_dtypes(tensors: dict[str, torch.Tensor], modules) -> list[torch.dtype]:
    """Dtypes of the float ``*.weight`` tensors outside the quantized `modules`, in order
    (``[torch.float32]`` when there is none): the save's "dtype" is the first; on load it
    must be one of them."""
    found = [t.dtype for k, t in tensors.items() if t.is_floating_point()
             and k.split(".")[-1] == "weight" and k.rsplit(".", 1)[0] not in modules]
    return found or [torch.float32]


def _fsync(path: Path) -> None:
    """Flush a written file (or, on POSIX, a directory's entries) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:                              # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_quantized(model: nn.Module, directory: str | os.PathLike, *,
                   overwrite: bool = False) -> Path:
    """Write `model` (quantized by `mixq.quantize`) to `directory` (created if needed).

    Each file is written under a temporary name in `directory` (``.model.safetensors.<id>.tmp``,
    ``.quant_config.json.<id>.tmp``), flushed to disk, and renamed into place only when both
    are complete: a crash or an error part-way never leaves a truncated file under the real
    names, and an existing checkpoint (with ``overwrite=True``) is replaced only by complete new
    files. Between the two renames (weights first) a crash leaves new weights with the old JSON,
    which `load_quantized` refuses (sha256 mismatch) rather than mixing them.

    Args:
        model: a Hugging Face causal LM with ``model.mixq_config`` set by `mixq.quantize`.
        directory: output folder.
        overwrite: replace an existing model.safetensors / quant_config.json in `directory`
            (default False: refuse; other files there are never touched).
    Returns:
        the directory as a Path.
    Raises:
        TypeError: `model` is not an nn.Module, or `overwrite` not a bool.
        ValueError: `model` has no mixq_config.
        FileExistsError: `directory` holds model.safetensors or quant_config.json (e.g. the
            float model this one was quantized from) and ``overwrite`` is False, or is a file.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    config = getattr(model, CONFIG_ATTR, None)
    if not isinstance(config, QuantConfig):
        raise ValueError("model has no mixq_config: quantize it with mixq.quantize first")
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory: pass a directory to "
                              "save_quantized")
    existing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {' and '.join(existing)} (a saved model, e.g. the float "
            f"checkpoint this model was quantized from): save_quantized would replace "
            f"{'them' if len(existing) > 1 else 'it'}. Save to another directory, or pass "
            f"overwrite=True to replace {'them' if len(existing) > 1 else 'it'}")
    out.mkdir(parents=True, exist_ok=True)
    modules = _module_entries(model)
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
    float_dtype = _float_dtypes(tensors, modules)[0]
    model_cfg = model.config.to_dict() if hasattr(model, "config") else {}
    meta = {"format": FORMAT, "mixq_version": _version(), "quant_config": config.to_dict(),
            "model_config": model_cfg, "dtype": str(float_dtype).removeprefix("torch."),
            "modules": modules, "wrappers": wrappers, "aliases": aliases}
    tag = uuid.uuid4().hex[:12]
    tmp_w, tmp_c = out / f".{WEIGHTS_NAME}.{tag}.tmp", out / f".{CONFIG_NAME}.{tag}.tmp"
    try:
        save_file(tensors, str(tmp_w), metadata={"format": FORMAT,
                                                 META_SHA_KEY: _meta_sha256(meta)})
        _fsync(tmp_w)
        meta["safetensors"] = {"file": WEIGHTS_NAME, "bytes": tmp_w.stat().st_size,
                               "sha256": sha256_file(tmp_w)}
        with open(tmp_c, "x", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=1, sort_keys=True, default=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_w, out / WEIGHTS_NAME)
        os.replace(tmp_c, out / CONFIG_NAME)
        _fsync(out)
    finally:
        for tmp in (tmp_w, tmp_c):
            tmp.unlink(missing_ok=True)
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


def _ignored_config_field(key: str, qconfig: QuantConfig) -> bool:
    return (key in _IGNORED_CONFIG or key.startswith(_IGNORED_PREFIXES)
            or (key == "tie_word_embeddings" and qconfig.quantize_lm_head))


def _check_model_config(model: nn.Module, saved: dict, qconfig: QuantConfig, *,
                        source: str = "model_factory's model") -> None:
    """The model's whole config dict (``config.to_dict()``, through JSON as saved) equals the
    saved one, but for the fields that do not change the function (`_IGNORED_CONFIG`,
    `_IGNORED_PREFIXES`; ``tie_word_embeddings`` when ``quantize_lm_head``, which unties the
    head); ValueError naming every other field that differs or is present on one side only."""
    have = model.config.to_dict() if hasattr(model, "config") else {}
    have = json.loads(json.dumps(have, default=str))
    missing = "<absent>"
    bad = [f"{k}: saved {saved.get(k, missing)!r}, model {have.get(k, missing)!r}"
           for k in sorted(set(saved) | set(have)) if not _ignored_config_field(k, qconfig)
           and saved.get(k, missing) != have.get(k, missing)]
    if bad:
        raise ValueError(f"{source} does not match the saved model config in {CONFIG_NAME} "
                         f"({len(bad)} field{'s' if len(bad) > 1 else ''}; the quantized "
                         f"weights were computed for the saved one): " + "; ".join(bad))


def _check_meta_sha(path: Path, cfg_path: Path, meta: dict) -> None:
    """quant_config.json against the ``quant_config_sha256`` of model.safetensors' header
    (files written before it existed have none: nothing to check)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} cannot be read as safetensors: {e}") from None
    want = header.get(META_SHA_KEY)
    if want is None:
        return
    got = _meta_sha256(meta)
    if got != want:
        raise ValueError(f"{cfg_path} does not match the {META_SHA_KEY} recorded in {path} "
                         f"(sha256 {got}, recorded {want}): the JSON was edited or corrupted "
                         "after saving (module attributes, quant_config and model_config must "
                         "stay as saved); restore it or save the model again")


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
        if "weight_layout" in vars(m):           # a W4A4Linear in the blocked layout
            want = quant.unpack_int4_blocked(packed, int(m.k_padded), qnn.W4A4_WEIGHT_BLOCK)
        else:
            want = quant.unpack_int4(packed, int(m.k_padded), signed=signed)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {name}.w_packed cannot be unpacked: {e}") from None
    if w_q.shape != want.shape or not torch.equal(w_q.to(want.device, torch.int8), want):
        raise ValueError(f"{path}: {name}.w_q does not equal unpack_int4({name}.w_packed): "
                         "corrupted file")


def _upgrade_module(path: Path, name: str, m: qnn.QuantLinearBase,
                    tensors: dict[str, torch.Tensor]) -> None:
    """Bring a module from an older save to the current layout: a W4A4Linear without
    ``weight_layout`` holds `quant.pack_int4` codes (N, ceil(Kp/2)); they are re-laid into the
    GEMM's blocked layout (`quant.pack_int4_blocked`), exactly, once at load time (in `m` and
    in `tensors`, which are loaded last)."""
    if not isinstance(m, qnn.W4A4Linear) or "weight_layout" in vars(m):
        return
    packed = m._buffers.get("w_packed")
    kp = getattr(m, "k_padded", None)
    if packed is None or isinstance(kp, bool) or not isinstance(kp, int) or kp < 1:
        return                                   # _check_module names what is missing
    try:
        codes = quant.unpack_int4(packed, kp, signed=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {name}.w_packed (an older save's int4 layout) cannot be "
                         f"unpacked: {e}") from None
    m.register_buffer("w_packed", quant.pack_int4_blocked(codes, qnn.W4A4_WEIGHT_BLOCK))
    m.weight_layout = qnn.WEIGHT_LAYOUT_W4A4
    tensors[f"{name}.w_packed"] = m.w_packed


def load_quantized(directory: str | os.PathLike, *, model_factory=None,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by `save_quantized`.

    Args:
        directory: the folder with model.safetensors and quant_config.json.
        model_factory: None (build the architecture from the saved HF config with random
            weights; every tensor is then overwritten) or a no-argument callable returning the
            float model of the same architecture (e.g. ``lambda: from_pretrained(path)``),
            whose ``config.to_dict()`` must equal the saved model config in every field that
            can change the function (all but `_IGNORED_CONFIG` / `_IGNORED_PREFIXES`, and
            ``tie_word_embeddings`` when the head was quantized): another ``rope_theta`` or
            ``rms_norm_eps`` is refused, not loaded with wrong logits.
        device: where the loaded tensors go.
    Returns:
        the quantized model in eval mode, with ``mixq_config`` set and the config's quantized
        attention / fused norms switched on (`mixq.api.apply_full_architecture`).
    Raises:
        ValueError: missing/corrupted/truncated/edited file (size, sha256 of either file), bad
            JSON, unknown module class, module attributes that contradict the tensors
            (`_check_module`), model config mismatch (naming every differing field),
            tensor-shape or dtype-kind mismatch, missing or unexpected tensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = _read_meta(directory)
    path = _check_file(directory, meta["safetensors"])
    _check_meta_sha(path, directory / CONFIG_NAME, meta)
    qconfig = QuantConfig.from_dict(meta["quant_config"])
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} cannot be read as safetensors: {e}") from None
    dtype = _decode_attr({"__dtype__": meta["dtype"]})
    found = _float_dtypes(tensors, meta["modules"])
    if dtype not in found:
        raise ValueError(f"{CONFIG_NAME} records dtype {meta['dtype']!r} but the float weights in "
                         f"{path} are {sorted({str(d) for d in found})}: edited or corrupted file")
    model = model_factory() if model_factory is not None else _default_factory(meta["model_config"])
    if not isinstance(model, nn.Module):
        raise ValueError(f"model_factory must return an nn.Module, got {type(model).__name__}")
    _check_model_config(model, meta["model_config"], qconfig,
                        source=("model_factory's model" if model_factory is not None
                                else "the model built from model_config"))
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
        _upgrade_module(path, name, m, tensors)
        _check_module(name, m)
        if isinstance(m, qnn.W4A4Linear):
            m.prepare_gather_index()                  # the kernels' channel gather (not saved)
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
    kinds = [f"{k}: file {tensors[k].dtype}, model {v.dtype}" for k, v in expected.items()
             if v.is_floating_point() != tensors[k].is_floating_point()]
    if kinds:
        raise ValueError("tensor dtypes do not match the model: " + "; ".join(kinds[:5]))
    for k, v in model.state_dict(keep_vars=True).items():   # float tensors keep the saved dtype
        if v.is_floating_point() and v.dtype != tensors[k].dtype:
            v.data = v.data.to(tensors[k].dtype)
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
