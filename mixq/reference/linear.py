"""Pure-PyTorch quantized linear layers: the ground truth every Triton kernel is tested against.

Each function spells out, in the order a kernel does it, the math of one quantized GEMM
``y = x @ W^T`` (x: (M, K) activations, W: (N, K) weights, as `torch.nn.Linear`):

* `w4a4_linear`: int4 activations (per-token scale) x int4 weights (per-channel or per-group
  scale), exact int32 accumulation, plus an fp16 path for the outlier channels.
* `w4a16_linear`: float activations x dequantized int4 weights (weight-only, for decode).
* `w8a8_linear`: int8 activations (per-token) x int8 weights (per-channel).

Integer parts (`quantize_per_token`, `int_matmul`) are exact, so kernels must match them bit
for bit; float parts follow a fixed order of operations so that kernels match to fp32 rounding.
This module never imports Triton: it runs on any device PyTorch runs on.
"""
from __future__ import annotations

import torch

from mixq.config import QuantSpec
from mixq.quant import quantize
from mixq.validation import FLOAT_DTYPES, check_divides, check_tensor, value_checks

__all__ = ["quantize_per_token", "int_matmul", "w4a4_linear", "w4a16_linear", "w8a8_linear",
           "dequantize_weight"]

_INT32_MAX = 2 ** 31 - 1
_EXACT_F64 = 2 ** 53          # float64 holds every integer below this exactly


def quantize_per_token(x: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token (per-row) RTN quantization of activations.

    Same as ``quantize(x, QuantSpec(bits, True, "row"))``::

        x_scale[m] = fp16(max_k |x[m, k]| / qmax)      (0 -> 1),   qmax = 2^(bits-1) - 1
        x_q[m, k]  = clamp(round(x[m, k] / x_scale[m]), -2^(bits-1), qmax)

    Args:
        x: (M, K) float tensor (fp16/bf16/fp32/fp64), finite.
        bits: 2..8 (4 for W4A4, 8 for W8A8).
    Returns:
        ``(x_q, x_scale)``: x_q int8 (M, K); x_scale fp16 (M, 1).
    """
    qt = quantize(x, QuantSpec(bits=bits, symmetric=True, granularity="row"))
    return qt.q, qt.scale


def int_matmul(a_q: torch.Tensor, b_q: torch.Tensor, *, method: str = "auto") -> torch.Tensor:
    """Exact integer GEMM ``a_q @ b_q.T`` with int32 output (any device).

    Two exact ways, chosen by `method`:

    * ``"float64"``: every product of two int8 values is below 2^14 in magnitude, so every
      partial sum is an integer below ``K * 2^14 < 2^53``: float64 rounds nothing, whatever
      the summation order. The result is checked to fit int32.
    * ``"int_mm"``: the vendor int8 GEMM (`torch._int_mm`), int32 accumulation, exact while
      ``K * 2^14 < 2^31`` (K < 131072). Several times faster than float64 on CPUs.

    ``"auto"`` (default) takes ``"int_mm"`` on CPU and ``"float64"`` elsewhere (cuBLAS's int8
    GEMM has shape constraints; `mixq.kernels.w8a8.int8_mm` handles them on the kernel path).

    Args:
        a_q: int8 (M, K).
        b_q: int8 (N, K).
        method: "auto" | "float64" | "int_mm".
    Returns:
        int32 (M, N), ``out[m, n] = sum_k a_q[m, k] * b_q[n, k]``.
    Raises:
        TypeError: not int8. ValueError: not 2-D, K mismatch, different devices, an unknown
            method, or a result outside the int32 range.
    """
    check_tensor(a_q, "a_q", ndim=2, dtypes=(torch.int8,))
    check_tensor(b_q, "b_q", ndim=2, dtypes=(torch.int8,))
    if a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"a_q (M, K) and b_q (N, K) must share K, got shapes "
                         f"{tuple(a_q.shape)} and {tuple(b_q.shape)}")
    if a_q.device != b_q.device:
        raise ValueError(f"a_q and b_q must be on one device, got {a_q.device} and {b_q.device}")
    if method not in ("auto", "float64", "int_mm"):
        raise ValueError(f"method must be 'auto', 'float64' or 'int_mm', got {method!r}")
    k = a_q.shape[1]
    if method == "auto":
        method = "int_mm" if a_q.device.type == "cpu" and k * 128 * 128 < _INT32_MAX else "float64"
    if method == "int_mm":
        if k * 128 * 128 >= _INT32_MAX:
            raise ValueError(f"K={k} can overflow an int32 accumulation; use method='float64'")
        return torch._int_mm(a_q.contiguous(), b_q.t())
    if k * 128 * 128 >= _EXACT_F64:
        raise ValueError(f"K={k} is too large for an exact float64 accumulation")
    out = a_q.double() @ b_q.double().T
    if out.numel() and value_checks() and float(out.abs().max()) > _INT32_MAX:
        raise ValueError(f"int_matmul result overflows int32 (max |value| {float(out.abs().max()):.0f}, "
                         f"K={k})")
    return out.to(torch.int32)


def _check_w_scale(w_scale: torch.Tensor, n: int, k: int, group_size: int | None,
                   name: str = "w_scale") -> int:
    """Validate a per-channel (N, 1) or per-group (N, K // g) scale; return the group size."""
    check_tensor(w_scale, name, ndim=2, dtypes=FLOAT_DTYPES, finite=True)
    if group_size is None:
        if tuple(w_scale.shape) != (n, 1):
            raise ValueError(f"{name} must have shape (N, 1) = ({n}, 1) when group_size is None "
                             f"(per channel), got {tuple(w_scale.shape)}")
        return k
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
    check_divides(group_size, k, f"group_size must divide K of w_q (N, K) = ({n}, {k}): group_size")
    if tuple(w_scale.shape) != (n, k // group_size):
        raise ValueError(f"{name} must have shape (N, K // group_size) = ({n}, {k // group_size}), "
                         f"got {tuple(w_scale.shape)}")
    return group_size


def _check_range(t: torch.Tensor, name: str, lo: int, hi: int) -> None:
    if not value_checks():       # reads the codes: not on the hot path (see mixq.validation)
        return
    tmin, tmax = int(t.min()), int(t.max())
    if tmin < lo or tmax > hi:
        raise ValueError(f"{name} values must be in [{lo}, {hi}], got range [{tmin}, {tmax}]")


def _check_x(x: torch.Tensor, k: int, name: str = "x") -> None:
    check_tensor(x, name, ndim=2, dtypes=FLOAT_DTYPES, finite=True)
    if x.shape[1] != k:
        raise ValueError(f"{name} (M, K) must have K = {k} columns to match the weights, "
                         f"got shape {tuple(x.shape)}")


def _check_int8_linear(x: torch.Tensor, w_q: torch.Tensor) -> tuple[int, int]:
    """Check an int8 (N, K) `w_q` and (M, K) float activations `x`; return (N, K)."""
    check_tensor(w_q, "w_q", ndim=2, dtypes=(torch.int8,))
    n, k = w_q.shape
    _check_x(x, k)
    return n, k


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return y
    check_tensor(bias, "bias", ndim=1, dtypes=FLOAT_DTYPES, finite=True)
    if bias.shape[0] != y.shape[1]:
        raise ValueError(f"bias must have shape (N,) = ({y.shape[1]},), got {tuple(bias.shape)}")
    return y + bias.float()


def w4a4_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, *,
                group_size: int | None = None, x_out: torch.Tensor | None = None,
                w_out: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W4A4 linear with an FP16 outlier path: the reference for the W4A4 GEMM kernel.

    Math (G groups of g columns; per channel: G = 1, g = Kq)::

        x_q, x_scale = quantize_per_token(x, 4)                  # int8 (M, Kq), fp16 (M, 1)
        acc_j = int_matmul(x_q[:, j*g:(j+1)*g], w_q[:, j*g:(j+1)*g])     # int32 (M, N), exact
        y     = sum_{j=0..G-1} acc_j.float() * w_scale[:, j].float()     # fp32, j in order
        y     = y * x_scale.float()
        y     = y + x_out.float() @ w_out.float().T                       # if outliers given
        y     = y + bias.float()                                          # if bias given

    Args:
        x: (M, Kq) float, the int4 part of the activations (outlier channels already split off,
            see `mixq.outliers.split_outliers`); finite.
        w_q: (N, Kq) int8 with values in [-8, 7] (symmetric int4 weights, unpacked).
        w_scale: (N, 1) per output channel, or (N, Kq // group_size) per group; float (fp16).
        group_size: None for per-channel scales, else the group size g (must divide Kq).
        x_out: (M, k) float (fp16), the outlier activation channels; needs `w_out`.
        w_out: (N, k) float (fp16), the matching weight columns; needs `x_out`.
        bias: (N,) float, optional.
    Returns:
        float32 (M, N).
    """
    n, k = _check_int8_linear(x, w_q)
    _check_range(w_q, "w_q", -8, 7)
    g = _check_w_scale(w_scale, n, k, group_size)
    x_q, x_scale = quantize_per_token(x, 4)
    y = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
    for j in range(k // g):
        cols = slice(j * g, (j + 1) * g)
        acc = int_matmul(x_q[:, cols], w_q[:, cols])
        y = y + acc.float() * w_scale[:, j].float()
    y = y * x_scale.float()
    if (x_out is None) != (w_out is None):
        raise ValueError("x_out and w_out go together: pass both (the FP16 outlier path) or neither")
    if x_out is not None:
        check_tensor(x_out, "x_out", ndim=2, dtypes=FLOAT_DTYPES, finite=True, nonempty=False)
        check_tensor(w_out, "w_out", ndim=2, dtypes=FLOAT_DTYPES, finite=True, nonempty=False)
        if x_out.shape[0] != x.shape[0] or w_out.shape[0] != n or x_out.shape[1] != w_out.shape[1]:
            raise ValueError(f"x_out must be (M, k) and w_out (N, k) with M={x.shape[0]}, N={n}; "
                             f"got {tuple(x_out.shape)} and {tuple(w_out.shape)}")
        y = y + x_out.float() @ w_out.float().T
    return _add_bias(y, bias)


def dequantize_weight(w_q: torch.Tensor, w_scale: torch.Tensor, *, group_size: int | None,
                      w_zero: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize per-channel / per-group int weights: ``W = (w_q - w_zero) * w_scale``, float32.

    Args:
        w_q: (N, K) integer tensor (int8/uint8/int16/int32).
        w_scale: (N, 1) (group_size None) or (N, K // group_size), float.
        group_size: None (per channel) or the group size along K.
        w_zero: None (symmetric) or same shape as `w_scale`, integer or float zero points.
    Returns:
        float32 (N, K); scale and zero of group j apply to columns ``j*g .. (j+1)*g - 1``.
    """
    check_tensor(w_q, "w_q", ndim=2, dtypes=(torch.int8, torch.uint8, torch.int16, torch.int32))
    n, k = w_q.shape
    g = _check_w_scale(w_scale, n, k, group_size)
    w = w_q.float()
    if w_zero is not None:
        check_tensor(w_zero, "w_zero", ndim=2, finite=True)
        if w_zero.shape != w_scale.shape:
            raise ValueError(f"w_zero must have the shape of w_scale {tuple(w_scale.shape)}, "
                             f"got {tuple(w_zero.shape)}")
        w = w - w_zero.float().repeat_interleave(g, dim=1)
    return w * w_scale.float().repeat_interleave(g, dim=1)


def w4a16_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, *,
                 group_size: int | None, w_zero: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int4 linear: ``y = x.float() @ dequantize_weight(w_q, w_scale, w_zero).T``.

    Math (fp32)::

        W[n, k] = (w_q[n, k] - w_zero[n, k // g]) * w_scale[n, k // g]     (w_zero = 0 if None)
        y       = x.float() @ W.T  (+ bias.float())

    Args:
        x: (M, K) float activations (fp16/bf16/fp32), finite.
        w_q: (N, K) int8 or uint8, values in [-8, 7] (symmetric, `w_zero` None) or [0, 15]
            (asymmetric, with `w_zero`).
        w_scale: (N, K // group_size) float (fp16), or (N, 1) when `group_size` is None.
        group_size: the group size g along K (required keyword; None = per channel).
        w_zero: None or (N, K // group_size) zero points (integer or float dtype).
        bias: (N,) float, optional.
    Returns:
        float32 (M, N).
    """
    check_tensor(w_q, "w_q", ndim=2, dtypes=(torch.int8, torch.uint8))
    if w_zero is None:
        _check_range(w_q, "w_q (symmetric, w_zero=None)", -8, 7)
    else:
        _check_range(w_q, "w_q (asymmetric, with w_zero)", 0, 15)
    w = dequantize_weight(w_q, w_scale, group_size=group_size, w_zero=w_zero)
    _check_x(x, w.shape[1])
    return _add_bias(x.float() @ w.T, bias)


def w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, *,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 linear: per-token int8 activations x per-channel int8 weights, int32 accumulation.

    Math::

        x_q, x_scale = quantize_per_token(x, 8)              # int8 (M, K), fp16 (M, 1)
        acc = int_matmul(x_q, w_q)                            # int32 (M, N), exact
        y   = acc.float() * w_scale.float().T                 # w_scale (N, 1) -> (1, N)
        y   = y * x_scale.float()  (+ bias.float())

    Args:
        x: (M, K) float, finite.
        w_q: (N, K) int8 (symmetric, values in [-128, 127]).
        w_scale: (N, 1) float (fp16), one per output channel.
        bias: (N,) float, optional.
    Returns:
        float32 (M, N).
    """
    n, k = _check_int8_linear(x, w_q)
    _check_w_scale(w_scale, n, k, None)
    x_q, x_scale = quantize_per_token(x, 8)
    y = int_matmul(x_q, w_q).float() * w_scale.float().T
    return _add_bias(y * x_scale.float(), bias)
