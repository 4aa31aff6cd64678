"""Triton kernel: RMSNorm / LayerNorm fused with the per-token activation quantization that feeds
the next W4A4 linear (one read of the hidden states, one pass).

Per token (row) m of the hidden states x (M, K), all math in fp32::

    RMSNorm (HF LlamaRMSNorm order, incl. its casts; dt_in = x.dtype, dt = promote(dt_in, w)):
        var[m]  = sum_c x[m, c]^2 / K
        h[m, c] = dt(w[c] * dt_in(x[m, c] * (1 / sqrt(var[m] + eps))))
    LayerNorm (torch.nn.functional.layer_norm; dt = x.dtype):
        mu[m]   = sum_c x[m, c] / K;   var[m] = sum_c (x[m, c] - mu[m])^2 / K
        h[m, c] = dt((x[m, c] - mu[m]) * (1 / sqrt(var[m] + eps)) * w[c] + b[c])

``dt(.)`` is a round-to-nearest-even cast; h is the tensor the model would hand to its linears.
The payload is then *exactly* ``mixq.kernels.act_quant.act_quant(h, ...)`` (same scale formula,
same IEEE division and half-to-even rounding, same formats), computed from the rounded h::

    x_scale[m] = fp16(max_{c in int4 part} |h[m, c]| / qmax)   (0 -> 1)
    x_q[m, j]  = clamp(round(h[m, c_j] / x_scale[m]), qmin, qmax)
    x_out[m, i] = fp16(h[m, o_i])

So the codes are bit-identical to quantizing the returned normed tensor, always. Against an
independent norm (HF, torch) h itself agrees to the last bit of `dt` except where the fp32 sum
over K, summed in another order, moves a value across a rounding boundary of `dt` (rare; the
sum order of a parallel reduction is not specified, neither torch's nor Triton's): there the
codes follow this kernel's own h. ``1 / sqrt`` is computed as two correctly rounded operations
(as torch does on CPU) rather than a hardware rsqrt approximation: it runs once per row.

The channel split is that of `act_quant`: the last ``n_outliers`` channels, or an `outlier_idx`
(int4 part = the other channels in original order, x_out in the order given). The row is
loaded in the gathered order ``[int4 part | outliers]`` (norm statistics do not depend on the
channel order), so packed int4 codes come out contiguous; the normed output is scattered back to
the original channel order.

One program handles BLOCK_M rows; a whole row lives in one register tile (K <= 16384). Wider
rows fall back to the unfused composition (torch norm, then the `act_quant` kernel).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mixq.kernels._triton import (autotune, check_kernel_device, fallback_to_reference,
                                  m_bucket, op_name)
from mixq.kernels.act_quant import _quantize_tile, _store_codes, act_quant, resolve_outliers
from mixq.kernels.act_quant import _prune  # same BLOCK_M * BLOCK_K register cap
from mixq.kernels.pack import cast_rne
from mixq.reference.norm import (NORM_KINDS, check_norm_args, norm_reference,
                                 quantize_normed_reference)
from mixq.validation import check_quant_args, check_tensor

__all__ = ["norm_act_quant", "norm_act_quant_prepared", "normed_dtype", "NORM_KINDS"]

_MAX_K = 16384               # widest row held in one register tile

_CONFIGS = [
    triton.Config({"BLOCK_M": 1}, num_warps=4),
    triton.Config({"BLOCK_M": 1}, num_warps=8),
    triton.Config({"BLOCK_M": 2}, num_warps=4),
    triton.Config({"BLOCK_M": 2}, num_warps=8),
    triton.Config({"BLOCK_M": 4}, num_warps=8),
]


@autotune(_CONFIGS, key=["K", "KO", "M_BUCKET", "PACKED", "RMS"],
          prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _norm_act_quant_kernel(x_ptr, w_ptr, b_ptr, perm_ptr, q_ptr, s_ptr, o_ptr, n_ptr,
                           M, K, KO, M_BUCKET, eps, stride_xm, stride_qm, stride_om, stride_nm,
                           RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr,
                           PACKED: tl.constexpr, STORE_NORMED: tl.constexpr,
                           QMIN: tl.constexpr, QMAX: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = tl.arange(0, BLOCK_K)              # position j in the order [int4 part | outliers]
    cmask = cols < K
    KQ = K - KO
    if HAS_PERM:
        src = tl.load(perm_ptr + cols, mask=cmask, other=0)
    else:
        src = cols
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + src[None, :], mask=m2, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + src, mask=cmask, other=0.0).to(tl.float32)
    if RMS:
        var = tl.math.div_rn(tl.sum(x * x, axis=1), K * 1.0)
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
        # HF casts x * rstd back to the input dtype before the weight multiply
        h = cast_rne(x * rstd[:, None], x_ptr.dtype.element_ty).to(tl.float32)
        y = w[None, :] * h
    else:
        mean = tl.math.div_rn(tl.sum(x, axis=1), K * 1.0)
        d = tl.where(cmask[None, :], x - mean[:, None], 0.0)
        var = tl.math.div_rn(tl.sum(d * d, axis=1), K * 1.0)
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
        y = d * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + src, mask=cmask, other=0.0).to(tl.float32)[None, :]
    # the model-dtype value the next linear would read; quantize exactly that
    y = cast_rne(y, n_ptr.dtype.element_ty).to(tl.float32)
    if STORE_NORMED:
        tl.store(n_ptr + rows[:, None] * stride_nm + src[None, :],
                 cast_rne(y, n_ptr.dtype.element_ty), mask=m2)
    is_q = cols < KQ
    absmax = tl.max(tl.where(is_q[None, :], tl.abs(y), 0.0), axis=1)
    scale = tl.math.div_rn(absmax, QMAX * 1.0).to(tl.float16)
    scale = tl.where(scale == 0, 1.0, scale).to(tl.float16)
    tl.store(s_ptr + rows, scale, mask=rmask)
    q = _quantize_tile(y, scale.to(tl.float32), QMIN, QMAX)
    q = tl.where(is_q[None, :], q, 0)          # an odd Kq's tail nibble must be 0, not an outlier
    _store_codes(q_ptr, q, rows, rmask, 0, KQ, stride_qm, PACKED, BLOCK_M, BLOCK_K)
    om = m2 & (cols >= KQ)[None, :]
    tl.store(o_ptr + rows[:, None] * stride_om + (cols - KQ)[None, :],
             cast_rne(y, o_ptr.dtype.element_ty), mask=om)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def normed_dtype(kind: str, x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """dtype of the norm's output: RMSNorm (HF) ``promote(x, weight)``; LayerNorm x's dtype."""
    return torch.promote_types(x_dtype, w_dtype) if kind == "rms" else x_dtype


def _norm_act_quant_impl(x, weight, bias, gather_idx, n_outliers, kind, eps, out_format, bits,
                         return_normed):
    m, k = x.shape
    kq = k - n_outliers
    packed = out_format == "packed"
    x_q = torch.empty((m, (kq + 1) // 2) if packed else (m, kq),
                      dtype=torch.uint8 if packed else torch.int8, device=x.device)
    x_scale = torch.empty((m, 1), dtype=torch.float16, device=x.device)
    x_out = torch.empty((m, n_outliers), dtype=torch.float16, device=x.device)
    dt = normed_dtype(kind, x.dtype, weight.dtype)
    # without return_normed a 1-element dummy carries the dtype; nothing is stored to it
    normed = torch.empty((m, k) if return_normed else (1,), dtype=dt, device=x.device)
    dummy = x_scale                            # for absent pointers, never read
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)     # noqa: E731
    _norm_act_quant_kernel[grid](
        x, weight, dummy if bias is None else bias, dummy if gather_idx is None else gather_idx,
        x_q, x_scale, x_out, normed, m, k, n_outliers, m_bucket(m), float(eps),
        x.stride(0), x_q.stride(0), max(n_outliers, 1), k,
        RMS=kind == "rms", HAS_BIAS=bias is not None, HAS_PERM=gather_idx is not None,
        PACKED=packed, STORE_NORMED=return_normed,
        QMIN=-(2 ** (bits - 1)), QMAX=2 ** (bits - 1) - 1, BLOCK_K=max(_next_pow2(k), 16))
    if not return_normed:
        normed = normed.new_empty((0, k))
    return x_q, x_scale, x_out, normed


@torch.library.custom_op(op_name("norm_act_quant"), mutates_args=())
def _norm_act_quant_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       gather_idx: Optional[torch.Tensor], n_outliers: int, kind: str, eps: float,
                       out_format: str, bits: int, return_normed: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _norm_act_quant_impl(x, weight, bias, gather_idx, n_outliers, kind, eps, out_format,
                                bits, return_normed)


@_norm_act_quant_op.register_fake
def _(x, weight, bias, gather_idx, n_outliers, kind, eps, out_format, bits, return_normed):
    m, k = x.shape
    kq = k - n_outliers
    if out_format == "packed":
        x_q = x.new_empty((m, (kq + 1) // 2), dtype=torch.uint8)
    else:
        x_q = x.new_empty((m, kq), dtype=torch.int8)
    dt = normed_dtype(kind, x.dtype, weight.dtype)
    return (x_q, x.new_empty((m, 1), dtype=torch.float16),
            x.new_empty((m, n_outliers), dtype=torch.float16),
            x.new_empty((m if return_normed else 0, k), dtype=dt))


def norm_act_quant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   kind: str = "rms", eps: float = 1e-6, n_outliers: int = 0,
                   outlier_idx: torch.Tensor | None = None, out_format: str = "packed",
                   bits: int = 4, also_return_normed: bool = False, check_finite: bool = True):
    """RMSNorm / LayerNorm of `x` and the per-token quantization of the result, one pass.

    Math: module docstring. Equals ``act_quant(h, n_outliers=..., outlier_idx=..., out_format=...,
    bits=...)`` bit for bit, h being the normed tensor returned with ``also_return_normed``.

    Args:
        x: (M, K) fp16/bf16/fp32 hidden states, contiguous; CUDA (or CPU under
            TRITON_INTERPRET=1). M >= 1.
        weight: (K,) fp16/bf16/fp32 norm weight (gamma), contiguous.
        bias: (K,) LayerNorm bias (beta), or None; only with ``kind="layer"``.
        kind: "rms" (HF LlamaRMSNorm) or "layer" (torch LayerNorm).
        eps: the norm's epsilon (> 0), added to the fp32 variance.
        n_outliers: k >= 0: the last k channels are the outliers (channels already permuted).
        outlier_idx: alternatively int64/int32 (k,) distinct channel indices, any order;
            exclusive with a nonzero `n_outliers` (costs a device sync to validate).
        out_format: "packed" (uint8 (M, ceil(Kq/2)), bits <= 4) or "int8" (int8 (M, Kq)).
        bits: 2..8, signed grid [-2^(bits-1), 2^(bits-1) - 1].
        also_return_normed: also return h (M, K) in `normed_dtype(kind, x.dtype, weight.dtype)`.
        check_finite: check x / weight / bias for NaN/Inf (a device sync; the fused module
            `mixq.nn.norm.QuantNorm` turns it off on its hot path).
    Returns:
        ``(x_q, x_scale, x_out)`` or ``(x_q, x_scale, x_out, normed)``: x_q as `out_format`;
        x_scale fp16 (M, 1); x_out fp16 (M, k); normed (M, K).
    Raises:
        TypeError / ValueError on a bad dtype, shape, device, layout, value or argument.
    """
    check_norm_args(x, weight, bias, kind, eps, finite=check_finite)
    check_kernel_device(x, "x")
    check_quant_args(out_format, bits, n_outliers)
    gather_idx, n_outliers = resolve_outliers(x, n_outliers, outlier_idx)
    out = _dispatch(x, weight, bias, gather_idx, n_outliers, kind, eps, out_format, bits,
                    also_return_normed)
    return out if also_return_normed else out[:3]


def norm_act_quant_prepared(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            gather_idx: torch.Tensor | None, n_outliers: int, *, kind: str,
                            eps: float, out_format: str, bits: int):
    """Hot-path entry of `norm_act_quant` for a static outlier set (used by
    `mixq.nn.norm.QuantNorm`): checks only shapes, no NaN/Inf scan and no device sync.

    Args:
        x: (M, K) contiguous. weight, bias: as `norm_act_quant`.
        gather_idx: int32 (K,) ``[int4 channels ascending | outliers]`` (e.g.
            `outlier_gather_index` or `mixq.outliers.outlier_permutation`, validated by the
            caller), or None when the outliers are the last `n_outliers` channels / none.
        n_outliers: k, the number of outlier channels.
    Returns:
        ``(x_q, x_scale, x_out, normed)`` as `norm_act_quant` with ``also_return_normed=True``.
    """
    check_norm_args(x, weight, bias, kind, eps, finite=False)
    check_kernel_device(x, "x")
    check_quant_args(out_format, bits, n_outliers)
    if gather_idx is not None:
        check_tensor(gather_idx, "gather_idx", ndim=1, dtypes=(torch.int32,), contiguous=True)
        if gather_idx.shape[0] != x.shape[1]:
            raise ValueError(f"gather_idx must have shape (K,) = ({x.shape[1]},), "
                             f"got {tuple(gather_idx.shape)}")
    if n_outliers >= x.shape[1]:
        raise ValueError(f"x (shape {tuple(x.shape)}) needs at least one int4 channel, "
                         f"got {n_outliers} outliers")
    return _dispatch(x, weight, bias, gather_idx, n_outliers, kind, eps, out_format, bits, True)


def _dispatch(x, weight, bias, gather_idx, n_outliers, kind, eps, out_format, bits,
              return_normed):
    if fallback_to_reference(x, "norm_act_quant") or x.shape[1] > _MAX_K:
        return _unfused(x, weight, bias, kind, eps, gather_idx, n_outliers, out_format, bits,
                        return_normed)
    impl = _norm_act_quant_op if torch.compiler.is_compiling() else _norm_act_quant_impl
    return impl(x, weight, bias, gather_idx, n_outliers, kind, float(eps), out_format, bits,
                return_normed)


def _unfused(x, weight, bias, kind, eps, gather_idx, n_outliers, out_format, bits, return_normed):
    """Torch norm, then the quantizer: the `mixq.reference.norm` reference on GPUs below sm80, the
    `act_quant` kernel for rows wider than one tile."""
    h = norm_reference(x, weight, bias, kind=kind, eps=eps)
    split = {"n_outliers": n_outliers} if gather_idx is None else \
        {"outlier_idx": gather_idx[x.shape[1] - n_outliers:].long()}
    quantizer = (quantize_normed_reference if fallback_to_reference(x, "norm_act_quant")
                 else act_quant)
    q = quantizer(h, out_format=out_format, bits=bits, **split)
    return (*q, h if return_normed else h.new_empty((0, x.shape[1])))
