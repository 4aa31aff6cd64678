"""Input checks shared by every public function: one clear error instead of silent garbage.

Each check raises `TypeError` for a wrong type/dtype and `ValueError` for a wrong shape, an
empty tensor or non-finite values, and names the argument and what it got.

Two kinds of checks
-------------------
* **Metadata checks** (type, dtype, ndim, shape, device, layout) read no tensor data: they run
  everywhere, always.
* **Value checks** (NaN/Inf, code ranges, int32 overflow) read the data. On a GPU that is a
  host synchronisation, and under `torch.compile` it turns a tensor into a Python value (a
  graph break). They run when a public function is called directly (quantizing, loading, the
  reference used on its own) but **not on the hot path**: inside the forward of a quantized
  module, norm, attention or KV cache (code wrapped in `hot_path`, whose tensors were checked
  when they were built or loaded), nor while `torch.compile` traces. `debug_checks(True)` or
  the environment variable ``MIXQ_DEBUG_CHECKS=1`` turns them on inside the hot path too
  (eager only: a debugging switch for finding where a NaN comes from).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

_F = TypeVar("_F", bound=Callable)
_DEBUG = os.environ.get("MIXQ_DEBUG_CHECKS", "0").strip().lower() in ("1", "true", "yes", "on")
_hot_depth = 0


def debug_checks(on: bool | None = None) -> bool:
    """Get, or set with `on`, the debug switch: value checks inside the hot path too.

    Returns the setting in force before the call (default: env ``MIXQ_DEBUG_CHECKS``)."""
    global _DEBUG
    before = _DEBUG
    if on is not None:
        if not isinstance(on, bool):
            raise TypeError(f"debug_checks takes a bool or None, got {type(on).__name__}")
        _DEBUG = on
    return before


def value_checks() -> bool:
    """Whether checks that read tensor values run here: never while `torch.compile` traces;
    outside `hot_path` always; inside it only with `debug_checks` on."""
    if torch.compiler.is_compiling():
        return False
    return _hot_depth == 0 or _DEBUG


def hot_path(fn: _F) -> _F:
    """Decorator for a forward on the hot path: value checks are off while it runs (see the
    module docstring). Under `torch.compile` it is transparent (no graph break)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        global _hot_depth
        _hot_depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _hot_depth -= 1
    return wrapper  # type: ignore[return-value]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(x, name: str, *, ndim: int | Iterable[int] | None = None,
                 dtypes: Iterable[torch.dtype] | None = None, finite: bool = False,
                 nonempty: bool = True, device: torch.device | str | None = None,
                 contiguous: bool = False) -> torch.Tensor:
    """Validate `x` and return it unchanged.

    Args:
        x: the value to check; must be a `torch.Tensor`.
        name: argument name used in the error message.
        ndim: required number of dims (an int or a collection of allowed ints).
        dtypes: allowed dtypes.
        finite: if True, NaN or +-Inf anywhere is a ValueError (floating tensors only; a
            value check: skipped where `value_checks()` is False).
        nonempty: if True, a tensor with zero elements is a ValueError.
        device: required device type ("cuda", "cpu") or device.
        contiguous: if True, a non-contiguous tensor is a ValueError.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, "
                             f"got shape {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if nonempty and x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if device is not None:
        want = torch.device(device)
        if x.device.type != want.type or (want.index is not None and x.device != want):
            raise ValueError(f"{name} must be on device {want}, got {x.device}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(x.shape)}, "
                         f"stride {x.stride()}); call .contiguous() first")
    if finite and value_checks():
        check_finite(x, name)
    return x


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """Raise ValueError if the floating tensor `x` holds NaN or +-Inf (counts in the message).
    A value check that always runs (a host sync): for an explicit opt-in such as
    ``KV4Cache(check_finite=True)``; `check_tensor(finite=True)` calls it only where
    `value_checks()` allows."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name} has non-finite values ({n_nan} NaN, {n_inf} Inf)")
    return x


def check_divides(divisor: int, total: int, what: str) -> None:
    """Raise ValueError unless `divisor` divides `total`, e.g. a group size and K."""
    if divisor <= 0 or total % divisor != 0:
        raise ValueError(f"{what}: {divisor} does not divide {total}")


#: output formats of the activation quantizers: 4-bit codes two per byte, or one int8 per code
ACT_FORMATS: tuple[str, ...] = ("packed", "int8")


def check_quant_args(out_format: str, bits: int, n_outliers: int) -> None:
    """Validate quantizer arguments with the rules of `mixq.kernels.act_quant.act_quant` (shared with the fused norm kernel)."""
    if out_format not in ACT_FORMATS:
        raise ValueError(f"out_format must be one of {ACT_FORMATS}, got {out_format!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if out_format == "packed" and bits > 4:
        raise ValueError(f"out_format='packed' holds 4-bit codes; bits={bits} needs out_format='int8'")
    if isinstance(n_outliers, bool) or not isinstance(n_outliers, int) or n_outliers < 0:
        raise ValueError(f"n_outliers must be an int >= 0, got {n_outliers!r}")
