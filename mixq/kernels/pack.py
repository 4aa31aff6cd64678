"""Triton kernel: quantize a weight matrix to int4 and pack two values per byte (offline step).

Math (per row, or per group of ``g`` consecutive columns of a row; all in float32)::

    symmetric:   s = fp16(absmax(block) / 7)                (0 -> 1)
                 q = clamp(round(w / s), -8, 7)
    asymmetric:  lo = min(min(block), 0),  hi = max(max(block), 0)
                 s = fp16((hi - lo) / 15)                     (0 -> 1)
                 z = clamp(round(-lo / s), 0, 15)
                 q = clamp(round(w / s) + z, 0, 15)

``/`` is IEEE round-to-nearest division (`tl.math.div_rn`) and ``round`` is half-to-even, so the
codes and scales are bit-identical to ``mixq.quant.quantize(w, QuantSpec(4, sym, gran, g))``
followed by ``mixq.quant.pack_int4``.

Packed layout (the one every mixq int4 kernel reads)::

    packed[n, j] = (q[n, 2j] & 0xF) | (q[n, 2j + 1] & 0xF) << 4       uint8 (N, ceil(K/2))

low nibble first, two's complement nibbles when symmetric, the tail nibble of an odd K is 0.
The int32 container holds eight nibbles, nibble i at bits 4i..4i+3 of word j: on a
little-endian machine this is the uint8 layout reinterpreted, so it is produced as a view.

Two launches: one program per (row block, group) reduces the block's range into its scale
(and zero); then one program per (row block, byte block) quantizes and packs. Splitting them
keeps every output byte owned by one program even when a group boundary falls inside a byte
(odd group sizes).
"""
import sys
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mixq.config import QuantSpec
from mixq.kernels._triton import check_kernel_device, op_name
from mixq.validation import check_divides, check_tensor

__all__ = ["PackedInt4", "quantize_pack_int4", "int4_container_view"]

_IN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# 1.5 * 2^23: adding and subtracting it rounds an fp32 |v| < 2^22 to the nearest integer, ties to
# even (the add lands in [2^23, 2^24) where the fp32 spacing is exactly 1). Portable: works in
# the interpreter and on every GPU, unlike libdevice rint.
ROUND_MAGIC = 12582912.0


@triton.jit
def round_half_even(v):
    """Round fp32 `v` (|v| < 2^22) to the nearest integer, ties to even; returns fp32."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def to_bf16_rne(x):
    """fp32 -> bf16 with round-to-nearest-even (finite x), as the GPU's cvt.rn does; the
    Triton 3.9 interpreter's own fp32 -> bf16 cast truncates instead."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536                    # & 0xFFFF0000
    return b.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """`x.to(dtype)` with IEEE round-to-nearest-even on every backend (see `to_bf16_rne`)."""
    if dtype == tl.bfloat16:
        res = to_bf16_rne(x.to(tl.float32))
    else:
        res = x.to(dtype)
    return res


@triton.jit
def _scale_kernel(w_ptr, s_ptr, z_ptr, N, K, G, stride_wn,
                  SYMMETRIC: tl.constexpr, QMAX: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """scale[n, gi] (and zero[n, gi]) of the block w[n, gi*G : (gi+1)*G], fp32 math."""
    pid_n = tl.program_id(0)
    gi = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    k_base = gi * G
    # running elementwise max/min tiles, reduced once after the loop: a reduction inside the
    # loop with two loop-carried results crashes Triton 3.6's OptimizeThreadLocality pass
    hi2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)     # |w| max when symmetric
    lo2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, G, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = rmask[:, None] & (cols < G)[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_wn + (k_base + cols)[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        if SYMMETRIC:
            hi2 = tl.maximum(hi2, tl.abs(w))
        else:
            hi2 = tl.maximum(hi2, w)                # masked zeros are harmless: hi >= 0 anyway
            lo2 = tl.minimum(lo2, w)
    hi = tl.max(hi2, axis=1)
    lo = tl.min(lo2, axis=1)
    n_groups = K // G
    if SYMMETRIC:
        scale = cast_rne(tl.math.div_rn(hi, QMAX * 1.0), s_ptr.dtype.element_ty)
    else:
        scale = cast_rne(tl.math.div_rn(hi - lo, QMAX * 1.0), s_ptr.dtype.element_ty)
    scale = tl.where(scale == 0, 1.0, scale).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + rows * n_groups + gi, scale, mask=rmask)
    if not SYMMETRIC:
        z = tl.math.div_rn(-lo, scale.to(tl.float32))
        z = round_half_even(tl.minimum(tl.maximum(z, 0.0), QMAX * 1.0))
        tl.store(z_ptr + rows * n_groups + gi, z.to(tl.uint8), mask=rmask)


@triton.jit
def _pack_kernel(w_ptr, s_ptr, z_ptr, p_ptr, N, K, G, KP, stride_wn,
                 SYMMETRIC: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """packed[n, j] for j in one block of BLOCK_P bytes (2*BLOCK_P columns)."""
    pid_n = tl.program_id(0)
    pid_p = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = pid_p * (2 * BLOCK_P) + tl.arange(0, 2 * BLOCK_P)       # contiguous, then de-interleaved
    mask = rmask[:, None] & (cols < K)[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=mask, other=0.0)
    n_groups = K // G
    gidx = tl.minimum(cols, K - 1) // G
    s = tl.load(s_ptr + rows[:, None] * n_groups + gidx[None, :], mask=mask, other=1.0)
    v = tl.math.div_rn(w.to(tl.float32), s.to(tl.float32))
    if SYMMETRIC:
        q = round_half_even(tl.minimum(tl.maximum(v, QMIN * 1.0), QMAX * 1.0))
    else:
        # round(v) + z clamped to [0, 15] equals the same with v first clamped to [-16, 16]
        # (z is in [0, 15]); the clamp keeps v inside the magic-number rounding range.
        z = tl.load(z_ptr + rows[:, None] * n_groups + gidx[None, :], mask=mask, other=0)
        q = round_half_even(tl.minimum(tl.maximum(v, -16.0), 16.0)) + z.to(tl.float32)
        q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)
    nib = tl.where(mask, q.to(tl.int32) & 0xF, 0)                  # the tail nibble pads with 0
    lo, hi = tl.split(tl.reshape(nib, (BLOCK_N, BLOCK_P, 2)))
    byte = (lo | (hi << 4)).to(tl.uint8)
    pcols = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    tl.store(p_ptr + rows[:, None] * KP + pcols[None, :], byte,
             mask=rmask[:, None] & (pcols < KP)[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@torch.library.custom_op(op_name("quantize_pack_int4"), mutates_args=())
def _quantize_pack_op(w: torch.Tensor, group_size: int, symmetric: bool,
                      scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = w.shape
    g = group_size
    kp = (k + 1) // 2
    packed = torch.empty((n, kp), dtype=torch.uint8, device=w.device)
    scale = torch.empty((n, k // g), dtype=scale_dtype, device=w.device)
    zero = torch.empty((n, k // g if not symmetric else 0), dtype=torch.uint8, device=w.device)
    qmax, qmin = (7, -8) if symmetric else (15, 0)
    z_arg = zero if not symmetric else scale          # never read when symmetric
    block_n = 16
    block_k = min(_next_pow2(g), 256)
    _scale_kernel[(triton.cdiv(n, block_n), k // g)](
        w, scale, z_arg, n, k, g, w.stride(0),
        SYMMETRIC=symmetric, QMAX=qmax, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    block_p = 128
    _pack_kernel[(triton.cdiv(n, block_n), triton.cdiv(kp, block_p))](
        w, scale, z_arg, packed, n, k, g, kp, w.stride(0),
        SYMMETRIC=symmetric, QMIN=qmin, QMAX=qmax, BLOCK_N=block_n, BLOCK_P=block_p, num_warps=4)
    return packed, scale, zero


@_quantize_pack_op.register_fake
def _(w, group_size, symmetric, scale_dtype):
    n, k = w.shape
    packed = w.new_empty((n, (k + 1) // 2), dtype=torch.uint8)
    scale = w.new_empty((n, k // group_size), dtype=scale_dtype)
    zero = w.new_empty((n, k // group_size if not symmetric else 0), dtype=torch.uint8)
    return packed, scale, zero


class PackedInt4(NamedTuple):
    """Result of `quantize_pack_int4`.

    Attributes:
        packed: uint8 (N, ceil(K/2)) (or int32 (N, ceil(K/8))), int4 codes along K, low nibble first.
        scale: (N, 1) per row or (N, K // g) per group, `scale_dtype` (fp16 default).
        zero: None (symmetric) or uint8 like `scale`, zero points in [0, 15].
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def int4_container_view(packed: torch.Tensor) -> torch.Tensor:
    """Reinterpret uint8 packed int4 (N, B) as the int32 container (N, ceil(B/4)).

    Eight nibbles per word, nibble i at bits 4i..4i+3 (= `mixq.quant.pack_int4(q, torch.int32)`).
    Zero bytes are appended when B is not a multiple of 4 (then it is a copy, not a view).
    """
    check_tensor(packed, "packed", ndim=2, dtypes=(torch.uint8,), contiguous=True)
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise RuntimeError("the int32 int4 container is defined for little-endian machines")
    pad = (-packed.shape[1]) % 4
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    return packed.view(torch.int32)


def quantize_pack_int4(w: torch.Tensor, spec: QuantSpec | None = None, *,
                       container: torch.dtype = torch.uint8,
                       scale_dtype: torch.dtype = torch.float16) -> PackedInt4:
    """Quantize `w` to int4 with per-row or per-group scales and pack it, on the GPU.

    Bit-identical to ``q = mixq.quant.quantize(w, spec); mixq.quant.pack_int4(q.q, container)``
    with ``q.scale`` / ``q.zero`` (see the module docstring for the math).

    Args:
        w: (N, K) fp16/bf16/fp32, contiguous, finite; CUDA (or CPU under TRITON_INTERPRET=1).
            Any K >= 1 (odd K pads the last byte's high nibble with 0).
        spec: QuantSpec with bits=4 and granularity "row" or "group" (group_size must divide K);
            symmetric or not. Default: ``QuantSpec(4, True, "row")``.
        container: torch.uint8 -> packed (N, ceil(K/2)); torch.int32 -> (N, ceil(K/8)).
        scale_dtype: dtype of the stored scales (fp16 default, as the contract says).
    Returns:
        `PackedInt4(packed, scale, zero)`: scale (N, 1) for "row", (N, K // g) for "group";
        zero uint8 of the same shape when asymmetric, else None.
    Raises:
        TypeError: wrong dtype / spec type. ValueError: wrong shape, device, non-contiguous,
            non-finite values, group_size not dividing K, or scales overflowing `scale_dtype`.
    """
    spec = QuantSpec(4, True, "row") if spec is None else spec
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a mixq.config.QuantSpec, got {type(spec).__name__}")
    if spec.bits != 4 or spec.granularity not in ("row", "group"):
        raise ValueError(f"quantize_pack_int4 supports bits=4 with granularity 'row' or 'group', "
                         f"got {spec.describe()}")
    check_tensor(w, "w", ndim=2, dtypes=_IN_DTYPES, contiguous=True)
    check_kernel_device(w, "w")
    if container not in (torch.uint8, torch.int32):
        raise TypeError(f"container must be torch.uint8 or torch.int32, got {container}")
    if scale_dtype not in _SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be one of {[str(d) for d in _SCALE_DTYPES]}, got {scale_dtype}")
    n, k = w.shape
    if spec.granularity == "group":
        check_divides(spec.group_size, k, f"group_size must divide K of w {tuple(w.shape)}: group_size")
        g = spec.group_size
    else:
        g = k
    if not torch.compiler.is_compiling():
        check_tensor(w, "w", finite=True)
    packed, scale, zero = _quantize_pack_op(w, g, spec.symmetric, scale_dtype)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(scale).all()):
        raise ValueError(f"w (shape {tuple(w.shape)}, max |w| = {float(w.float().abs().max()):.4g}) "
                         f"gives a scale that overflows scale_dtype={scale_dtype}")
    if container == torch.int32:
        packed = int4_container_view(packed)
    return PackedInt4(packed, scale, None if spec.symmetric else zero)
