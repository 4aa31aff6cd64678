"""Input checks shared by every public function: one clear error instead of silent garbage.

Each check raises `TypeError` for a wrong type/dtype and `ValueError` for a wrong shape, an
empty tensor or non-finite values, and names the argument and what it got.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

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
        finite: if True, NaN or +-Inf anywhere is a ValueError (floating tensors only).
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
    if finite and x.is_floating_point() and not bool(torch.isfinite(x).all()):
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
