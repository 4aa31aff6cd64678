"""Shared Triton plumbing for every mixq kernel: interpreter detection, device checks,
capability checks, autotune lists, the once-only fallback warning and custom-op naming.

Every kernel module imports its helpers from here so that all kernels agree on one rule set:

* A kernel runs on a CUDA tensor, or on a CPU tensor when `TRITON_INTERPRET=1` (CI, no GPU).
* Autotuning tries the full config list on a GPU and only the first config under the
  interpreter (each interpreted launch costs seconds, and timing it means nothing).
* GPUs without the tensor-core instructions a kernel needs (compute capability below 8.0,
  e.g. the Colab T4) get one warning per kernel and fall back to the `mixq.reference` path.

Names here are a stable API used by kernels-a (pack/act_quant/w4a16) and kernels-b (w4a4, bench).
"""
from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

OP_NAMESPACE = "mixq"
"""Namespace of every torch custom op registered by mixq kernels, e.g. `torch.ops.mixq.act_quant`."""

_TRUE = ("1", "true", "yes", "on")


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (env `TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def require_triton():
    """Import and return the `triton` module, or raise ImportError with an install hint."""
    try:
        import triton
    except ImportError as e:  # pragma: no cover - triton ships with CUDA torch wheels
        raise ImportError(
            "mixq.kernels needs Triton (pip install triton); the pure-PyTorch path in "
            "mixq.reference works without it") from e
    return triton


def check_kernel_device(t: torch.Tensor, name: str) -> torch.Tensor:
    """Raise ValueError unless `t` can be handed to a Triton kernel.

    A kernel needs a CUDA tensor, or a CPU tensor when `interpret_mode()` is on. Returns `t`.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "cuda":
        return t
    if t.device.type == "cpu" and interpret_mode():
        return t
    hint = ("set TRITON_INTERPRET=1 before importing triton to run kernels on CPU"
            if t.device.type == "cpu" else "Triton kernels run on CUDA devices only")
    raise ValueError(f"{name} must be a CUDA tensor, got a tensor on {t.device} "
                     f"(shape {tuple(t.shape)}); {hint}")


def check_same_device(tensors: dict[str, torch.Tensor | None]) -> None:
    """Raise ValueError unless every non-None tensor in `tensors` (name -> tensor) shares one device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    dev0 = items[0][1].device
    for n, t in items[1:]:
        if t.device != dev0:
            raise ValueError(f"{n} is on {t.device} but {items[0][0]} is on {dev0}; "
                             "all kernel operands must be on one device")


def _as_capability(c: float | int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(c, tuple):
        return (int(c[0]), int(c[1]))
    major = int(c)
    minor = int(round((float(c) - major) * 10))
    return (major, minor)


def is_cuda_capable_for(min_capability: float | tuple[int, int], device=None) -> bool:
    """True when CUDA is available and the device's compute capability is >= `min_capability`.

    Args:
        min_capability: e.g. `(8, 0)` or `8.0` (Ampere: bf16 / int8 tensor cores), `(9, 0)` Hopper.
        device: CUDA device (index, str or torch.device); None = the current device.
    """
    if not torch.cuda.is_available():
        return False
    if isinstance(device, int):
        index = device
    else:
        index = None if device is None else torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    return _capability(index) >= _as_capability(min_capability)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def kernel_device() -> torch.device:
    """The device kernels run on here: CUDA when present, else CPU (meaningful under the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_WARNED: set[str] = set()


def fallback_to_reference(t: torch.Tensor, name: str, min_capability=(8, 0)) -> bool:
    """Decide whether kernel `name` must take the `mixq.reference` path for operand `t`.

    Returns True (and warns once per kernel name, one line) when `t` is a CUDA tensor on a GPU
    whose compute capability is below `min_capability`, e.g. a T4 (7.5) lacks bf16 tensor cores.
    Returns False otherwise: CUDA tensors on capable GPUs, and CPU tensors (the caller's device
    check decides whether those may run under the interpreter).
    """
    if t.device.type != "cuda":
        return False
    if is_cuda_capable_for(min_capability, t.device):
        return False
    if name not in _WARNED:
        _WARNED.add(name)
        cap = torch.cuda.get_device_capability(t.device)
        warnings.warn(
            f"mixq: {name} needs compute capability >= {_as_capability(min_capability)}, "
            f"{torch.cuda.get_device_name(t.device)} has {cap}; using the slower mixq.reference path",
            RuntimeWarning, stacklevel=3)
    return True


def autotune_disabled() -> bool:
    """True under the interpreter, or when env `MIXQ_NO_AUTOTUNE=1` (read at kernel import):
    then every kernel runs the first config of its list, with no benchmarking."""
    return interpret_mode() or os.environ.get("MIXQ_NO_AUTOTUNE", "0").strip().lower() in _TRUE


def autotune_configs(configs: Sequence[Any]) -> list:
    """The autotune list to use: all `configs` on a GPU, only the first under the interpreter
    (or with `MIXQ_NO_AUTOTUNE=1`, e.g. for quick GPU test runs)."""
    configs = list(configs)
    if not configs:
        raise ValueError("autotune_configs: need at least one config")
    return configs[:1] if autotune_disabled() else configs


@functools.lru_cache(maxsize=1)
def _autotune_params() -> frozenset[str]:
    triton = require_triton()
    try:
        return frozenset(inspect.signature(triton.autotune).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return frozenset()


def autotune(configs: Sequence[Any], key: list[str], **kwargs) -> Callable:
    """`triton.autotune` with mixq's defaults: `autotune_configs(configs)`, and on-disk caching of
    the tuning result (`cache_results=True`) when the installed Triton's autotune accepts it
    (checked on the signature, not the version), so a warm process skips re-benchmarking.
    Keyword arguments the installed Triton does not know are dropped.
    """
    triton = require_triton()
    params = _autotune_params()
    if "cache_results" in params and not interpret_mode():
        kwargs.setdefault("cache_results", True)
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    return triton.autotune(configs=autotune_configs(configs), key=key, **kwargs)


def round_up(v: int, multiple: int) -> int:
    """`v` rounded up to a multiple of `multiple` (both positive ints): padded widths of kernel
    operands (int8 GEMM alignment, W4A4 K blocks, padded act-quant codes)."""
    return -(-v // multiple) * multiple


def m_bucket(m: int) -> int:
    """Coarse bucket of the token count M used as an autotune key (so tuning runs once per
    regime, not once per exact M): 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096+."""
    if m <= 1:
        return 1
    return min(1 << (int(m) - 1).bit_length(), 4096)


def op_name(name: str) -> str:
    """Qualified custom-op name `mixq::<name>` for `torch.library.custom_op`."""
    return f"{OP_NAMESPACE}::{name}"
