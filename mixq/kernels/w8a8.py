"""W8A8 GEMM: per-token int8 activations x per-channel int8 weights on int8 tensor cores.

The integer product runs on the vendor int8 GEMM (`torch._int_mm`, cuBLASLt IMMA on CUDA, also
available on CPU), which is exact: int8 x int8 products summed in int32. The activation
quantization is the Triton `act_quant` kernel (bits=8, int8 codes). The epilogue is the same
fp32 arithmetic as `mixq.reference.w8a8_linear`, so the result equals the reference bit for bit::

    x_q, x_scale = act_quant(x, bits=8)                 # int8 (M, K), fp16 (M, 1)
    acc = x_q @ w_q.T                                   # int32 (M, N), exact
    y   = acc.float() * w_scale.float().T * x_scale.float() (+ bias.float())

`torch._int_mm` on CUDA needs M > 16 and K, N multiples of 8: `int8_mm` zero-pads to that
(zero rows/columns add nothing to the dot products) and slices the padding off again.
"""
from __future__ import annotations

import torch

from mixq.kernels._triton import check_same_device, op_name, round_up
from mixq.validation import check_tensor

__all__ = ["int8_mm", "pad_weight_for_int_mm", "w8a8_matmul"]

_MIN_M_CUDA = 17          # torch._int_mm on CUDA: M must exceed 16
_ALIGN = 8                # ... and K, N must be multiples of 8


def pad_weight_for_int_mm(w_q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) -> int8 (N8, K8), zero-padded to multiples of 8 (what `int8_mm` needs on CUDA).

    Build it once per layer; `int8_mm` accepts the padded weight and slices the output to N.
    """
    check_tensor(w_q, "w_q", ndim=2, dtypes=(torch.int8,))
    n, k = w_q.shape
    n8, k8 = round_up(n, _ALIGN), round_up(k, _ALIGN)
    if (n8, k8) == (n, k):
        return w_q.contiguous()
    return torch.nn.functional.pad(w_q, (0, k8 - k, 0, n8 - n))


def int8_mm(a_q: torch.Tensor, b_q: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Exact ``a_q @ b_q.T`` in int32 on the int8 GEMM (`torch._int_mm`).

    Args:
        a_q: int8 (M, K).
        b_q: int8 (N', K') with K' >= K (extra columns must be zero, as `pad_weight_for_int_mm`
            makes them); N' >= n.
        n: output columns kept (default N').
    Returns:
        int32 (M, n), equal to `mixq.reference.int_matmul(a_q, b_q[:n, :K])`.
    """
    check_tensor(a_q, "a_q", ndim=2, dtypes=(torch.int8,))
    check_tensor(b_q, "b_q", ndim=2, dtypes=(torch.int8,))
    check_same_device({"a_q": a_q, "b_q": b_q})
    m, k = a_q.shape
    n = b_q.shape[0] if n is None else n
    if b_q.shape[1] < k or not 0 < n <= b_q.shape[0]:
        raise ValueError(f"b_q {tuple(b_q.shape)} does not cover a_q {tuple(a_q.shape)} with n={n}")
    if a_q.is_cuda:
        b_q = pad_weight_for_int_mm(b_q)
    kb = b_q.shape[1]
    m_pad = max(m, _MIN_M_CUDA) if a_q.is_cuda else m
    if (m_pad, kb) != (m, k):
        a_q = torch.nn.functional.pad(a_q, (0, kb - k, 0, m_pad - m))
    out = torch._int_mm(a_q.contiguous(), b_q.t())
    return out[:m, :n]


def w8a8_matmul(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, *,
                bias: torch.Tensor | None = None, n: int | None = None) -> torch.Tensor:
    """W8A8 linear on the kernels; equals `mixq.reference.w8a8_linear` bit for bit.

    Args:
        x: (M, K) fp16/bf16/fp32, contiguous, finite; CUDA (or CPU under TRITON_INTERPRET=1).
        w_q: int8 (N', K') weights (N' >= N, K' >= K, zero padding; see `pad_weight_for_int_mm`).
        w_scale: (N, 1) fp16 per-output-channel scales.
        bias: optional (N,) float.
        n: N, the real output width (default w_scale's rows).
    Returns:
        float32 (M, N).
    """
    check_tensor(w_scale, "w_scale", ndim=2)
    n = w_scale.shape[0] if n is None else n
    if w_scale.shape != (n, 1):
        raise ValueError(f"w_scale must have shape ({n}, 1), got {tuple(w_scale.shape)}")
    return _w8a8_matmul_op(x, w_q, w_scale, bias, n)


def _w8a8_matmul_impl(x, w_q, w_scale, bias, n):
    from mixq.kernels.act_quant import act_quant

    x_q, x_scale, _ = act_quant(x, out_format="int8", bits=8)
    y = int8_mm(x_q, w_q, n).float() * w_scale.float().T
    y = y * x_scale.float()
    return y if bias is None else y + bias.float()


# One custom op (opaque to torch.compile): inductor would fuse the fp32 epilogue and may contract
# ``y * x_scale + bias`` into an FMA, so a compiled model would round differently from eager
# (and a changed last bit can flip an int8 code of the next layer's activations).
@torch.library.custom_op(op_name("w8a8_matmul"), mutates_args=())
def _w8a8_matmul_op(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, n: int) -> torch.Tensor:
    return _w8a8_matmul_impl(x, w_q, w_scale, bias, n)


@_w8a8_matmul_op.register_fake
def _(x, w_q, w_scale, bias, n):
    return x.new_empty((x.shape[0], n), dtype=torch.float32)
