"""Triton kernel: W4A4 for a few tokens (decode), the activation quantization fused in.

Motivation
----------
At decode (M <= 16 tokens) a W4A4 linear is bound by reading its int4 weights, and the two
launches of the prefill path -- `mixq.kernels.act_quant` writing int8 codes, then
`mixq.kernels.w4a4.w4a4_gemm` reading them -- cost a launch, a round trip through global memory
and a dependency per layer. Here one kernel does both: every program quantizes the few rows of
``x`` itself (the rows are tiny and stay in L2; re-reading them per weight tile costs far less
than a launch), then runs the same int8 tensor-core main loop on the same pre-shuffled weights
(`mixq.quant.pack_int4_blocked`), the FP16 outliers read straight from ``x`` at their original
positions.

Math -- bit for bit `act_quant` followed by `w4a4_gemm` (the same helper functions compute
the scale and the codes, and the integer main loop is exact)::

    c_j       = gather_idx[j] (or j)            the Kq int4 channels first, then the k outliers
    s[m]      = fp16(absmax_j<Kq |x[m, c_j]| / qmax), 1 where that is 0
    x_q[m, j] = clamp(round_half_even(x[m, c_j] / s[m]), qmin, qmax)
    y[m, n]   = (sum_groups float(int32 sum x_q * w_q) * w_scale[n, g]) * s[m]
                + sum_i fp16(x[m, c_{Kq+i}]) * w_out[n, i] + bias[n]

Tiling: up to `GEMV_MAX_M` tokens, one program per (BN weight rows, one token) on CUDA cores
(int32 multiply-adds, nothing through shared memory); more, one program per (BN weight rows,
BM = 16 tokens) tile on the int8 tensor cores. Either way a first pass over K finds the row's
absmax, and the main loop re-reads x (float), quantizes a block and multiplies it. The integer
parts are exact; the FP16 outlier sum of the CUDA-core path adds in another order than the
tensor cores' (equal under the interpreter, within fp32 rounding on a GPU).

Public API: `w4a4_decode_gemm(x, w_packed, w_scale, ...)` -> (M, N) (torch op
``torch.ops.mixq.w4a4_decode_gemm``); `DECODE_MAX_M`, the largest M `mixq.nn.W4A4Linear`
sends here.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mixq.kernels import tuned
from mixq.kernels._triton import (autotune, check_kernel_device, check_same_device, m_bucket,
                                  op_name, round_up)
from mixq.kernels.act_quant import _load_x, _quantize_tile
from mixq.kernels.pack import cast_rne, round_half_even
from mixq.kernels.w4a4 import W4A4_BLOCK_K, _check_block_k, _unpack_hi, _unpack_lo, _use_asm
from mixq.validation import check_tensor

__all__ = ["DECODE_MAX_M", "GEMV_MAX_M", "w4a4_decode_gemm"]

DECODE_MAX_M = 16
"""Token counts up to this run the fused decode kernel in `mixq.nn.W4A4Linear`."""

_BM = 16                       # tokens per tile (the int8 wgmma's N; M <= 16 is one tile)
_IN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

GEMV_MAX_M = 4
"""Up to this many tokens the one-token-per-program CUDA-core kernel runs (each program reads
its weight rows once per token, so it pays off only for very few tokens)."""

_GEMV_CONFIGS = [triton.Config({"BN": bn}, num_warps=w, num_stages=s)
                 for bn, w, s in [(32, 4, 3), (16, 4, 3), (64, 4, 3), (32, 8, 4), (64, 8, 4),
                                  (16, 2, 4)]]

_CONFIGS = [triton.Config({"BN": bn}, num_warps=w, num_stages=s)
            for bn, w, s in [(64, 4, 4), (32, 4, 4), (128, 4, 4), (64, 4, 2), (128, 8, 3),
                             (256, 8, 3)]]


@triton.jit
def _codes(x_ptr, perm_ptr, rows, rmask, k0, KQ, stride_xm, s32,
           HAS_PERM: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
           HALF: tl.constexpr):
    """int8 codes (BM, HALF) of the int4 channels k0 .. k0+HALF (0 past Kq)."""
    xk = _load_x(x_ptr, perm_ptr, rows, rmask, k0, KQ, stride_xm, HAS_PERM, HALF)
    return _quantize_tile(xk, s32, QMIN, QMAX).to(tl.int8)


@triton.jit
def _block(acc, w_ptrs, x_ptr, perm_ptr, rows, rmask, p0, KQ, stride_xm, s32,
           HAS_PERM: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
           HALF: tl.constexpr, USE_ASM: tl.constexpr):
    """acc (BN, BM) int32 += 16 * W_block @ codes_block^T for the block at packed column p0."""
    w = tl.load(w_ptrs + p0)
    x_lo = _codes(x_ptr, perm_ptr, rows, rmask, 2 * p0, KQ, stride_xm, s32,
                  HAS_PERM, QMIN, QMAX, HALF)
    x_hi = _codes(x_ptr, perm_ptr, rows, rmask, 2 * p0 + HALF, KQ, stride_xm, s32,
                  HAS_PERM, QMIN, QMAX, HALF)
    acc = tl.dot(_unpack_lo(w, USE_ASM), tl.trans(x_lo), acc, out_dtype=tl.int32)
    acc = tl.dot(_unpack_hi(w, USE_ASM), tl.trans(x_hi), acc, out_dtype=tl.int32)
    return acc


@autotune(_CONFIGS, key=["M_BUCKET", "N", "KQ", "KP", "GROUP", "KO"])
@triton.jit
def _w4a4_decode_kernel(x_ptr, perm_ptr, w_ptr, ws_ptr, wo_ptr, b_ptr, y_ptr,
                        M, N, KQ, KP, KO, M_BUCKET,
                        stride_xm, stride_wn, stride_wsn, stride_won, stride_ym,
                        BLOCK_K: tl.constexpr, GROUP: tl.constexpr, HAS_OUT: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr, USE_ASM: tl.constexpr,
                        BKO: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr):
    HALF: tl.constexpr = BLOCK_K // 2
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    rows_n = tl.minimum(offs_n, N - 1)       # clamp instead of masking: tails are never stored
    rows_m = tl.minimum(offs_m, M - 1)
    rmask = rows_m < M                       # all true (clamped): loads need no row mask
    offs_p = tl.arange(0, HALF)
    w_ptrs = w_ptr + rows_n[:, None].to(tl.int64) * stride_wn + offs_p[None, :]

    # pass 1: per-token absmax of the int4 channels -> the fp16 scale act_quant would store
    absmax = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, KQ, BLOCK_K):
        xk = _load_x(x_ptr, perm_ptr, rows_m, rmask, k0, KQ, stride_xm, HAS_PERM, BLOCK_K)
        absmax = tl.maximum(absmax, tl.max(tl.abs(xk), axis=1))
    scale = tl.math.div_rn(absmax, QMAX * 1.0).to(tl.float16)
    scale = tl.where(scale == 0, 1.0, scale).to(tl.float16)
    s32 = scale.to(tl.float32)

    # pass 2: quantize a block, multiply it on the int8 tensor cores (W zero-padded past Kq)
    if GROUP == 0:
        acc = tl.zeros((BN, BM), dtype=tl.int32)
        for p0 in range(0, KP, HALF):
            acc = _block(acc, w_ptrs, x_ptr, perm_ptr, rows_m, rmask, p0, KQ, stride_xm, s32,
                         HAS_PERM, QMIN, QMAX, HALF, USE_ASM)
        ws = tl.load(ws_ptr + rows_n * stride_wsn).to(tl.float32)
        out = (acc >> 4).to(tl.float32) * ws[:, None]
    else:
        out = tl.zeros((BN, BM), dtype=tl.float32)
        for g0 in range(0, KP, GROUP // 2):
            part = tl.zeros((BN, BM), dtype=tl.int32)
            for s in tl.static_range(GROUP // BLOCK_K):
                part = _block(part, w_ptrs, x_ptr, perm_ptr, rows_m, rmask, g0 + s * HALF, KQ,
                              stride_xm, s32, HAS_PERM, QMIN, QMAX, HALF, USE_ASM)
            ws = tl.load(ws_ptr + rows_n * stride_wsn + (2 * g0) // GROUP).to(tl.float32)
            out += (part >> 4).to(tl.float32) * ws[:, None]
    out = out * s32[None, :]

    if HAS_OUT:   # FP16 outliers, read from their original channels of x
        for o0 in range(0, KO, BKO):
            ocols = o0 + tl.arange(0, BKO)
            omask = ocols < KO
            if HAS_PERM:
                src = tl.load(perm_ptr + KQ + ocols, mask=omask, other=0)
            else:
                src = KQ + ocols
            xo = tl.load(x_ptr + rows_m[:, None].to(tl.int64) * stride_xm + src[None, :],
                         mask=omask[None, :], other=0.0)
            xo = cast_rne(xo, wo_ptr.dtype.element_ty)
            wo = tl.load(wo_ptr + rows_n[:, None].to(tl.int64) * stride_won + ocols[None, :],
                         mask=omask[None, :], other=0.0)
            out = tl.dot(wo, tl.trans(xo), out)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rows_n).to(tl.float32)
        out = out + bias[:, None]
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nibbles(w):
    """(low, high) signed nibbles of uint8 `w` as int32."""
    b = w.to(tl.int32)
    return ((b & 0xF) ^ 8) - 8, (((b >> 4) & 0xF) ^ 8) - 8


@triton.jit
def _load_row(x_ptr, perm_ptr, row, k0, KQ, HAS_PERM: tl.constexpr, WIDTH: tl.constexpr):
    """x[token, c_j] for j in k0..k0+WIDTH as fp32 (0 past Kq), c_j = perm[j] or j."""
    cols = k0 + tl.arange(0, WIDTH)
    cmask = cols < KQ
    if HAS_PERM:
        src = tl.load(perm_ptr + cols, mask=cmask, other=0)
    else:
        src = cols
    return tl.load(x_ptr + row + src, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _gemv_block(acc, w_ptrs, x_ptr, perm_ptr, row, p0, KQ, s32,
                HAS_PERM: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                HALF: tl.constexpr):
    """acc (BN,) int32 += W_block @ codes_block for one token (CUDA cores, no shared memory)."""
    w_lo, w_hi = _nibbles(tl.load(w_ptrs + p0))
    xk = _load_row(x_ptr, perm_ptr, row, 2 * p0, KQ, HAS_PERM, 2 * HALF)
    v = tl.minimum(tl.maximum(tl.math.div_rn(xk, s32), QMIN * 1.0), QMAX * 1.0)
    q = round_half_even(v).to(tl.int32)        # the codes of act_quant's _quantize_tile
    q_lo, q_hi = tl.split(tl.permute(tl.reshape(q, (2, HALF)), (1, 0)))
    return acc + tl.sum(w_lo * q_lo[None, :], axis=1) + tl.sum(w_hi * q_hi[None, :], axis=1)


@autotune(_GEMV_CONFIGS, key=["N", "KQ", "KP", "GROUP", "KO"])
@triton.jit
def _w4a4_gemv_kernel(x_ptr, perm_ptr, w_ptr, ws_ptr, wo_ptr, b_ptr, y_ptr,
                      M, N, KQ, KP, KO, M_BUCKET,
                      stride_xm, stride_wn, stride_wsn, stride_won, stride_ym,
                      BLOCK_K: tl.constexpr, GROUP: tl.constexpr, HAS_OUT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr, USE_ASM: tl.constexpr,
                      BKO: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
    """One token x BN weight rows per program, on CUDA cores: the weight-bandwidth-bound
    path for M <= `GEMV_MAX_M` (no tensor-core tile of 16 tokens to fill). Same arguments as
    `_w4a4_decode_kernel` (M_BUCKET, USE_ASM, BKO and BM unused here)."""
    HALF: tl.constexpr = BLOCK_K // 2
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    m = tl.program_id(1)
    rows_n = tl.minimum(offs_n, N - 1)
    row = m.to(tl.int64) * stride_xm
    offs_p = tl.arange(0, HALF)
    w_ptrs = w_ptr + rows_n[:, None].to(tl.int64) * stride_wn + offs_p[None, :]
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, KQ, BLOCK_K):
        xk = _load_row(x_ptr, perm_ptr, row, k0, KQ, HAS_PERM, BLOCK_K)
        absmax = tl.maximum(absmax, tl.abs(xk))
    scale = tl.math.div_rn(tl.max(absmax, axis=0), QMAX * 1.0).to(tl.float16)
    scale = tl.where(scale == 0, 1.0, scale).to(tl.float16)
    s32 = scale.to(tl.float32)
    if GROUP == 0:
        acc = tl.zeros((BN,), dtype=tl.int32)
        for p0 in tl.range(0, KP, HALF):
            acc = _gemv_block(acc, w_ptrs, x_ptr, perm_ptr, row, p0, KQ, s32, HAS_PERM,
                              QMIN, QMAX, HALF)
        ws = tl.load(ws_ptr + rows_n * stride_wsn).to(tl.float32)
        out = acc.to(tl.float32) * ws
    else:
        out = tl.zeros((BN,), dtype=tl.float32)
        for g0 in range(0, KP, GROUP // 2):
            part = tl.zeros((BN,), dtype=tl.int32)
            for s in tl.static_range(GROUP // BLOCK_K):
                part = _gemv_block(part, w_ptrs, x_ptr, perm_ptr, row, g0 + s * HALF, KQ, s32,
                                   HAS_PERM, QMIN, QMAX, HALF)
            ws = tl.load(ws_ptr + rows_n * stride_wsn + (2 * g0) // GROUP).to(tl.float32)
            out += part.to(tl.float32) * ws
    out = out * s32
    if HAS_OUT:   # fp16 products are exact in fp32; the sum order differs from the tensor cores
        for o0 in range(0, KO, 64):
            ocols = o0 + tl.arange(0, 64)
            omask = ocols < KO
            if HAS_PERM:
                src = tl.load(perm_ptr + KQ + ocols, mask=omask, other=0)
            else:
                src = KQ + ocols
            xo = tl.load(x_ptr + row + src, mask=omask, other=0.0)
            xo = cast_rne(xo, wo_ptr.dtype.element_ty).to(tl.float32)
            wo = tl.load(wo_ptr + rows_n[:, None].to(tl.int64) * stride_won + ocols[None, :],
                         mask=omask[None, :], other=0.0).to(tl.float32)
            out += tl.sum(wo * xo[None, :], axis=1)
    if HAS_BIAS:
        out = out + tl.load(b_ptr + rows_n).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty),
             mask=offs_n < N)


def _outlier_step(k: int) -> int:
    """Outlier K-step, as `w4a4_gemm` takes it (same fp32 accumulation order): one step of
    next_pow2(k) >= 16 up to 128 channels, else steps of 64."""
    return 64 if k > 128 else max(16, 1 << max(0, k - 1).bit_length())


def _launch(x, gather_idx, n_outliers, w_packed, w_scale, group_size, block_k, w_out, bias,
            bits, out_dtype, config=None):
    m, k_total = x.shape
    n = w_packed.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return y
    kq = k_total - n_outliers
    has_out = n_outliers > 0
    dummy = w_packed                          # never read when the matching flag is off
    args = (x, gather_idx if gather_idx is not None else dummy, w_packed, w_scale,
            w_out if has_out else dummy, bias if bias is not None else dummy, y,
            m, n, kq, w_packed.shape[1], n_outliers, m_bucket(m),
            x.stride(0), w_packed.stride(0), w_scale.stride(0),
            w_out.stride(0) if has_out else 0, y.stride(0))
    meta = dict(BLOCK_K=block_k, GROUP=group_size or 0, HAS_OUT=has_out,
                HAS_BIAS=bias is not None, HAS_PERM=gather_idx is not None,
                USE_ASM=_use_asm(x), BKO=_outlier_step(n_outliers),
                QMIN=-(2 ** (bits - 1)), QMAX=2 ** (bits - 1) - 1, BM=_BM)

    key = (m_bucket(m), n, kq, w_packed.shape[1], group_size or 0, n_outliers, x.dtype,
           out_dtype, bits)
    if m <= GEMV_MAX_M and config is None:           # one token per program (CUDA cores)
        tuned.launch("w4a4_gemv", key[1:], _w4a4_gemv_kernel, _w4a4_gemv_kernel.fn,
                     lambda cfg: (triton.cdiv(n, cfg["BN"]), m), args, meta, x.device)
        return y

    def grid(cfg):
        return (triton.cdiv(n, cfg["BN"]), triton.cdiv(m, _BM))

    if config is None:     # a shipped / remembered config, else autotune once (mixq.kernels.tuned)
        tuned.launch("w4a4_decode", key, _w4a4_decode_kernel, _w4a4_decode_kernel.fn, grid,
                     args, meta, x.device)
    else:
        tuned.run_config(_w4a4_decode_kernel.fn, grid, args, meta, config)
    return y


@torch.library.custom_op(op_name("w4a4_decode_gemm"), mutates_args=())
def _decode_op(x: torch.Tensor, gather_idx: Optional[torch.Tensor], n_outliers: int,
               w_packed: torch.Tensor, w_scale: torch.Tensor, group_size: int, block_k: int,
               w_out: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int,
               out_dtype: torch.dtype) -> torch.Tensor:
    return _launch(x, gather_idx, n_outliers, w_packed, w_scale, group_size, block_k, w_out,
                   bias, bits, out_dtype)


@_decode_op.register_fake
def _(x, gather_idx, n_outliers, w_packed, w_scale, group_size, block_k, w_out, bias, bits,
      out_dtype):
    return x.new_empty((x.shape[0], w_packed.shape[0]), dtype=out_dtype)


def w4a4_decode_gemm(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, *,
                     n_outliers: int = 0, gather_idx: torch.Tensor | None = None,
                     w_out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     group_size: int | None = None, block_k: int = W4A4_BLOCK_K,
                     bits: int = 4, out_dtype: torch.dtype = torch.bfloat16,
                     validate: bool = True) -> torch.Tensor:
    """``act_quant(x) -> w4a4_gemm`` in one kernel, for a few tokens (see the module docstring).

    Args:
        x: (M, K) fp16/bf16/fp32 contiguous activations, channels in their original order
            when `gather_idx` is given, else already permuted (the last `n_outliers` are the
            outliers). Any M works; it is fast for M <= `DECODE_MAX_M`.
        w_packed: uint8 (N, Kpad/2), `quant.pack_int4_blocked(w_q, block_k)` of the (N, Kq)
            int4 weight of the regular channels, Kq = K - n_outliers, Kpad = Kq rounded up to
            `block_k`.
        w_scale: (N, 1) per channel or (N, Kpad // group_size) per group; fp16/bf16/fp32.
        n_outliers: k >= 0 FP16 channels. gather_idx: int32 (K,) channel order
            ``[int4 channels | outliers]`` (e.g. `act_quant.outlier_gather_index`), or None.
        w_out: (N, k) fp16/bf16 outlier weight columns (required when k > 0).
        bias: optional (N,) float. group_size: None or a multiple of `block_k`.
        bits: activation code width (2..8; 4 = W4A4). out_dtype: bf16 (default)/fp16/fp32.
        validate: False skips the checks (callers that validated at build time).
    Returns:
        (M, N) `out_dtype`, equal bit for bit to ``w4a4_gemm(*act_quant(x, ...), ...)``.
    Raises:
        TypeError / ValueError on a bad dtype, shape, device or argument.
    """
    impl = _decode_op if torch.compiler.is_compiling() else _launch
    if validate:
        _check(x, w_packed, w_scale, n_outliers, gather_idx, w_out, bias, group_size, block_k,
               bits, out_dtype)
    return impl(x, gather_idx, n_outliers, w_packed, w_scale, group_size or 0, block_k, w_out,
                bias, bits, out_dtype)


def _check(x, w_packed, w_scale, n_outliers, gather_idx, w_out, bias, group_size, block_k,
           bits, out_dtype) -> None:
    check_tensor(x, "x", ndim=2, dtypes=_IN_DTYPES, contiguous=True)
    check_tensor(w_packed, "w_packed", ndim=2, dtypes=(torch.uint8,), contiguous=True)
    check_tensor(w_scale, "w_scale", ndim=2, dtypes=_SCALE_DTYPES)
    check_kernel_device(x, "x")
    block_k = _check_block_k(block_k)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in _OUT_DTYPES]}, got {out_dtype}")
    m, k_total = x.shape
    n = w_packed.shape[0]
    if isinstance(n_outliers, bool) or not isinstance(n_outliers, int) or \
            not 0 <= n_outliers < k_total:
        raise ValueError(f"n_outliers must be an int in [0, K={k_total}), got {n_outliers!r}")
    kq = k_total - n_outliers
    kpad = round_up(kq, block_k)
    if w_packed.shape[1] != kpad // 2:
        raise ValueError(f"w_packed must have shape (N, {kpad // 2}) for Kq={kq} int4 channels "
                         f"in blocks of {block_k}, got {tuple(w_packed.shape)}")
    if w_scale.stride(1) != 1:
        raise ValueError(f"w_scale must have unit stride along its last dim, got {w_scale.stride()}")
    groups = 1 if group_size is None else kpad // group_size
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size <= 0 or group_size % block_k):
        raise ValueError(f"group_size must be None or a positive multiple of block_k={block_k}, "
                         f"got {group_size!r}")
    if tuple(w_scale.shape) != (n, groups):
        raise ValueError(f"w_scale must have shape ({n}, {groups}), got {tuple(w_scale.shape)}")
    if gather_idx is not None:
        check_tensor(gather_idx, "gather_idx", ndim=1, dtypes=(torch.int32,), contiguous=True)
        if gather_idx.shape[0] != k_total:
            raise ValueError(f"gather_idx must have shape ({k_total},), got {tuple(gather_idx.shape)}")
    if n_outliers:
        if w_out is None:
            raise ValueError(f"n_outliers={n_outliers} needs w_out (N, {n_outliers})")
        check_tensor(w_out, "w_out", ndim=2, dtypes=(torch.float16, torch.bfloat16),
                     contiguous=True)
        if tuple(w_out.shape) != (n, n_outliers):
            raise ValueError(f"w_out must have shape ({n}, {n_outliers}), got {tuple(w_out.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=_SCALE_DTYPES, contiguous=True)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    check_same_device({"x": x, "w_packed": w_packed, "w_scale": w_scale, "gather_idx": gather_idx,
                       "w_out": w_out if n_outliers else None, "bias": bias})
