"""RMSNorm / LayerNorm and the activation quantization that follows them: the torch reference of
`mixq.kernels.norm_quant` (the fused kernel) and of `mixq.nn.norm.QuantNorm`.

Math, per token (row), fp32 inside::

    RMSNorm (HF LlamaRMSNorm, exactly its ops and casts):
        y = weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
    LayerNorm (torch.nn.functional.layer_norm):
        y = ((x - mean) * rsqrt(var + eps) * weight + bias).to(x.dtype)     (var biased)

then `quantize_normed_reference`, the torch form of `act_quant`: per-token symmetric codes of
the non-outlier channels (`mixq.reference.quantize_per_token`), fp16 copy of the outliers.
"""
from __future__ import annotations

import math

import torch

from mixq import outliers as _outliers
from mixq import quant
from mixq.reference.linear import quantize_per_token
from mixq.validation import check_quant_args, check_tensor

__all__ = ["norm_reference", "quantize_normed_reference", "norm_act_quant_reference",
           "check_norm_args", "NORM_KINDS", "NORM_DTYPES"]

NORM_KINDS = ("rms", "layer")
NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_IN_DTYPES = NORM_DTYPES


# ----------------------------------------------------------------------------- validation
def check_norm_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str,
                    eps: float, *, finite: bool) -> None:
    """Validate norm operands: x (M, K) contiguous fp16/bf16/fp32 non-empty, weight (K,),
    bias (K,) only for "layer", eps finite > 0, one device; NaN/Inf too when `finite`."""
    check_tensor(x, "x", ndim=2, dtypes=_IN_DTYPES, contiguous=True, finite=finite)
    k = x.shape[1]
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {NORM_KINDS}, got {kind!r}")
    check_tensor(weight, "weight", ndim=1, dtypes=_IN_DTYPES, contiguous=True, finite=finite)
    if weight.shape[0] != k:
        raise ValueError(f"weight must have shape (K,) = ({k},) to match x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        if kind == "rms":
            raise ValueError("bias is only used by kind='layer' (RMSNorm has no bias)")
        check_tensor(bias, "bias", ndim=1, dtypes=_IN_DTYPES, contiguous=True, finite=finite)
        if bias.shape[0] != k:
            raise ValueError(f"bias must have shape (K,) = ({k},) to match x {tuple(x.shape)}, "
                             f"got {tuple(bias.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    devices = {t.device for t in (x, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, weight and bias must be on one device, got {sorted(map(str, devices))}")


# ----------------------------------------------------------------------------- reference
def norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   kind: str = "rms", eps: float = 1e-6) -> torch.Tensor:
    """The norm as the model computes it (math: module docstring); no validation.

    Args:
        x: (..., K) float hidden states. weight: (K,). bias: (K,) or None ("layer" only).
        kind: "rms" or "layer". eps: added to the fp32 variance.
    Returns:
        (..., K): dtype ``promote(x, weight)`` for "rms" (as HF), x.dtype for "layer".
    """
    xf = x.float()
    if kind == "rms":
        var = xf.pow(2).mean(-1, keepdim=True)
        return weight * (xf * torch.rsqrt(var + eps)).to(x.dtype)
    d = xf - xf.mean(-1, keepdim=True)
    y = d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def quantize_normed_reference(h: torch.Tensor, *, n_outliers: int = 0,
                              outlier_idx: torch.Tensor | None = None, out_format: str = "packed",
                              bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch form of `act_quant` (same outputs bit for bit) on normed activations h (M, K).

    With o = the last `n_outliers` channels or `outlier_idx` (in its order), and the int4 part
    the other channels in ascending order::

        x_q, x_scale = reference.quantize_per_token(h[:, int4 part], bits)   (packed: pack_int4)
        x_out        = h[:, o].to(fp16)

    Returns:
        ``(x_q, x_scale, x_out)``: uint8 (M, ceil(Kq/2)) or int8 (M, Kq); fp16 (M, 1); fp16 (M, k).
    """
    check_tensor(h, "h", ndim=2, dtypes=_IN_DTYPES, finite=True)
    check_quant_args(out_format, bits, n_outliers)
    k = h.shape[1]
    if outlier_idx is None:
        outlier_idx = torch.arange(k - n_outliers, k, device=h.device)
    elif n_outliers:
        raise ValueError("pass either n_outliers or outlier_idx, not both")
    perm = _outliers.outlier_permutation(k, outlier_idx.to(h.device))
    kq = k - outlier_idx.numel()
    if kq < 1:
        raise ValueError(f"h (shape {tuple(h.shape)}) needs at least one int4 channel, "
                         f"got {outlier_idx.numel()} outliers")
    x_q, x_scale = quantize_per_token(h[:, perm[:kq]], bits)
    if out_format == "packed":
        x_q = quant.pack_int4(x_q)
    return x_q, x_scale, h[:, perm[kq:]].to(torch.float16)


def norm_act_quant_reference(x: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None = None, *, kind: str = "rms",
                             eps: float = 1e-6, n_outliers: int = 0,
                             outlier_idx: torch.Tensor | None = None, out_format: str = "packed",
                             bits: int = 4, also_return_normed: bool = False):
    """Reference of `mixq.kernels.norm_quant.norm_act_quant`: `norm_reference` then
    `quantize_normed_reference`; same arguments and outputs, any device.

    Args:
        x: (M, K) fp16/bf16/fp32 contiguous, finite. weight, bias: (K,). Others: see the kernel.
    Returns:
        ``(x_q, x_scale, x_out)`` (+ ``normed`` (M, K) with `also_return_normed`).
    """
    check_norm_args(x, weight, bias, kind, eps, finite=True)
    h = norm_reference(x, weight, bias, kind=kind, eps=eps)
    out = quantize_normed_reference(h, n_outliers=n_outliers, outlier_idx=outlier_idx,
                                    out_format=out_format, bits=bits)
    return (*out, h) if also_return_normed else out

