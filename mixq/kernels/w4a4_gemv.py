"""Triton kernel: W4A4 for one to four tokens (decode) on CUDA cores, bound by the weight read.

Motivation
----------
At decode a W4A4 linear multiplies one token (M = 1, up to `GEMV_MAX_M`) by an (N, K) int4
weight. The work is N * K multiply-adds -- nothing for the GPU -- but the N * K / 2 weight bytes
must stream from HBM: 8 MiB for a 4096 x 4096 layer, about 2.5 us at the H100's 3.35 TB/s.
The tensor-core GEMM of `mixq.kernels.w4a4` is the wrong shape for this: its smallest token
tile is 16 (wgmma's N), so 15/16 of the MMA work is padding, and with 64-128 weight rows per
program a 4096-row layer has 32-64 programs for 132 SMs, too few loads in flight to reach the
memory bandwidth (measured 18 us for that layer on the H100, act-quant included).

Here each program owns only a few weight rows (`BN`, 4-32) and walks the whole K, reading
`BKB` contiguous bytes per row per step (wide coalesced loads), so there are N / BN programs
(512 for N = 4096 with BN = 8) and the HBM stream stays full. The int4 nibbles are unpacked in
registers and multiplied by the int8 activation codes on the CUDA cores (int32 multiply-adds);
the elementwise products accumulate in a (BM, BN, BKB) int32 register tile that is reduced
once per scale group (once at the end for per-channel scales), not once per step.

Inputs are those of `mixq.kernels.w4a4.w4a4_gemm`, which sends M <= `GEMV_MAX_M` here: the
activation codes of `mixq.kernels.act_quant` (or of a fused `mixq.nn.QuantNorm`) and the same
pre-shuffled weight (`mixq.quant.pack_int4_blocked`: in each block of ``block_k`` columns,
byte j holds column j in its low nibble and column j + block_k/2 in its high nibble), so no
second copy of the weights exists. The byte at packed column P multiplies the activation
columns ``(P // h) * block_k + P % h`` (low) and that + h (high), h = block_k / 2.

Math, in the order of `mixq.reference.w4a4_linear` (and of the tensor-core kernel)::

    acc_j[m, n] = sum_{k in group j} x_q[m, k] * w_q[n, k]          int32, exact
    y[m, n]     = sum_j float(acc_j[m, n]) * w_scale[n, j]          fp32, j ascending
    y[m, n]     = y[m, n] * x_scale[m]
    y[m, n]    += sum_k x_out[m, k] * w_out[n, k]                   fp16 products, fp32 sum
    y[m, n]    += bias[n]

Everything before the outlier term is bit for bit the tensor-core kernel's result (integer
sums are exact in any order, and the float steps are the same operations in the same order);
the outlier sum adds the same exact fp16 products in another order (equal to fp32 rounding).

Public API: `w4a4_gemv(x_q, x_scale, w_packed, w_scale, ...)` (operands validated by the
caller, `mixq.kernels.w4a4.w4a4_gemm`), `GEMV_MAX_M`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mixq.kernels import tuned
from mixq.kernels._triton import autotune

__all__ = ["GEMV_MAX_M", "w4a4_gemv"]

GEMV_MAX_M = int(os.environ.get("MIXQ_W4A4_GEMV_MAX_M", "4"))
"""`mixq.kernels.w4a4.w4a4_gemm` runs this kernel for 1 <= M <= GEMV_MAX_M tokens (each program
reuses its weight tile for every token, so the CUDA-core work grows with M; 0, or env
``MIXQ_W4A4_GEMV_MAX_M=0`` at import, always runs the tensor-core kernel)."""


def _cfg(bn: int, bkb: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BN": bn, "BKB": bkb}, num_warps=warps, num_stages=stages)


# (weight rows per program, packed bytes per row per step): BN * BKB bytes in flight per step.
# The first entry is what the interpreter (and MIXQ_NO_AUTOTUNE=1) runs.
_CONFIGS = [_cfg(8, 256, 4, 3), _cfg(4, 256, 4, 3), _cfg(8, 128, 4, 4), _cfg(16, 128, 4, 3),
            _cfg(16, 256, 8, 3), _cfg(4, 512, 4, 3), _cfg(32, 64, 4, 4), _cfg(16, 64, 4, 4),
            _cfg(8, 64, 2, 4)]


def _configs_for(half: int, group: int) -> list:
    """The configs valid for a shuffle half-block of `half` bytes and `group` (0: per channel):
    BKB a multiple of `half` that divides the group's bytes; a listed config whose BKB does
    not fit takes the largest that does (duplicates dropped)."""
    out, seen = [], set()
    for c in _CONFIGS:
        bkb = c.kwargs["BKB"]
        if group:
            bkb = min(bkb, group // 2)
            while (group // 2) % bkb:
                bkb //= 2
        bkb = max(bkb - bkb % half, half)
        key = (c.kwargs["BN"], bkb, c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(_cfg(*key))
    return out


@triton.jit
def _nibble_products(w, xl, xh):
    """(BM, BN, BKB) int32 products: signed low/high nibbles of the uint8 bytes `w` (BN, BKB)
    times the int8 codes `xl` / `xh` (BM, BKB) of the columns they hold."""
    b = w.to(tl.int32)
    lo = ((b & 0xF) ^ 8) - 8
    hi = (((b >> 4) & 0xF) ^ 8) - 8
    return lo[None, :, :] * xl.to(tl.int32)[:, None, :] + hi[None, :, :] * xh.to(tl.int32)[:, None, :]


@triton.jit
def _step(acc, w_ptrs, x_rows, mmask, p0, K, KP, col_lo, offs_b,
          HALF: tl.constexpr, MASK_W: tl.constexpr):
    """acc (BM, BN, BKB) += products of the BKB packed columns from p0 (x masked past K)."""
    if MASK_W:
        w = tl.load(w_ptrs + p0, mask=(p0 + offs_b)[None, :] < KP, other=0)
    else:
        w = tl.load(w_ptrs + p0)
    k_lo = 2 * p0 + col_lo
    xl = tl.load(x_rows + k_lo[None, :], mask=mmask[:, None] & (k_lo < K)[None, :], other=0)
    xh = tl.load(x_rows + (k_lo + HALF)[None, :],
                 mask=mmask[:, None] & (k_lo + HALF < K)[None, :], other=0)
    return acc + _nibble_products(w, xl, xh)


@triton.jit
def _w4a4_gemv_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, xo_ptr, wo_ptr, b_ptr, y_ptr,
                      M, N, K, KP, KO, M_BUCKET,
                      stride_xm, stride_wn, stride_wsn, stride_xom, stride_won, stride_ym,
                      BLOCK_K: tl.constexpr, GROUP: tl.constexpr, HAS_OUT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BKO: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, BKB: tl.constexpr):
    """One program: BN weight rows x all M (<= BM) tokens, the whole K."""
    HALF: tl.constexpr = BLOCK_K // 2
    MASK_W: tl.constexpr = GROUP == 0          # group steps tile KP exactly (BKB | GROUP/2)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    rows_n = tl.minimum(offs_n, N - 1)          # clamp instead of masking: tails never stored
    offs_m = tl.arange(0, BM)
    mmask = offs_m < M
    offs_b = tl.arange(0, BKB)
    col_lo = (offs_b // HALF) * BLOCK_K + offs_b % HALF     # column of each byte's low nibble
    w_ptrs = w_ptr + rows_n[:, None].to(tl.int64) * stride_wn + offs_b[None, :]
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm

    if GROUP == 0:
        acc = tl.zeros((BM, BN, BKB), dtype=tl.int32)
        for p0 in range(0, KP, BKB):
            acc = _step(acc, w_ptrs, x_rows, mmask, p0, K, KP, col_lo, offs_b, HALF, MASK_W)
        ws = tl.load(ws_ptr + rows_n * stride_wsn).to(tl.float32)
        out = tl.sum(acc, axis=2).to(tl.float32) * ws[None, :]
    else:
        out = tl.zeros((BM, BN), dtype=tl.float32)
        for g0 in range(0, KP, GROUP // 2):
            part = tl.zeros((BM, BN, BKB), dtype=tl.int32)
            for s in tl.static_range(GROUP // 2 // BKB):
                part = _step(part, w_ptrs, x_rows, mmask, g0 + s * BKB, K, KP, col_lo, offs_b,
                             HALF, MASK_W)
            ws = tl.load(ws_ptr + rows_n * stride_wsn + (2 * g0) // GROUP).to(tl.float32)
            out += tl.sum(part, axis=2).to(tl.float32) * ws[None, :]

    xs = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0).to(tl.float32)
    out = out * xs[:, None]
    if HAS_OUT:
        offs_o = tl.arange(0, BKO)
        for o0 in range(0, KO, BKO):
            omask = (o0 + offs_o) < KO
            xo = tl.load(xo_ptr + offs_m[:, None].to(tl.int64) * stride_xom + (o0 + offs_o)[None, :],
                         mask=mmask[:, None] & omask[None, :], other=0.0).to(tl.float32)
            wo = tl.load(wo_ptr + rows_n[:, None].to(tl.int64) * stride_won + (o0 + offs_o)[None, :],
                         mask=omask[None, :], other=0.0).to(tl.float32)
            out += tl.sum(wo[None, :, :] * xo[:, None, :], axis=2)
    if HAS_BIAS:
        out = out + tl.load(b_ptr + rows_n).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & (offs_n < N)[None, :])


_KEY = ["M_BUCKET", "N", "K", "BLOCK_K", "GROUP", "HAS_OUT"]
_TUNERS: dict = {}


def _tuner(half: int, group: int):
    """The autotuner over `_configs_for(half, group)` (one per shuffle/group geometry)."""
    t = _TUNERS.get((half, group))
    if t is None:
        t = _TUNERS[(half, group)] = autotune(_configs_for(half, group), key=_KEY)(
            _w4a4_gemv_kernel)
    return t


def _pow2_at_least(m: int) -> int:
    return 1 << max(0, m - 1).bit_length()


def w4a4_gemv(x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor,
              w_scale: torch.Tensor, group_size: int, block_k: int,
              x_out: torch.Tensor | None, w_out: torch.Tensor | None,
              bias: torch.Tensor | None, out_dtype: torch.dtype,
              config: triton.Config | None = None) -> torch.Tensor:
    """``y = (x_q @ w_q^T) * scales + x_out @ w_out^T + bias`` for M <= `GEMV_MAX_M` tokens.

    Operands exactly as `mixq.kernels.w4a4.w4a4_gemm` takes them after its checks (that
    function validates and dispatches here; this one checks nothing):

    Args:
        x_q: int8 (M, K) contiguous activation codes, K = Kq or the weight's Kpad.
        x_scale: (M,) contiguous per-token scales (fp16/bf16/fp32).
        w_packed: uint8 (N, Kpad/2) `prepare_w4a4_weight` layout, shuffle block `block_k`.
        w_scale: (N, 1) (group_size 0) or (N, K // group_size), unit stride along dim 1.
        group_size: 0 (per channel) or a multiple of `block_k`.
        x_out, w_out: (M, k) / (N, k) fp16 or bf16 outlier operands, or None.
        bias: (N,) or None. out_dtype: bf16 / fp16 / fp32.
        config: a triton.Config (``BN``, ``BKB``) that bypasses autotuning (tests, benchmarks).
    Returns:
        (M, N) `out_dtype`.
    """
    m, k = x_q.shape
    n = w_packed.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"w4a4_gemv takes at most GEMV_MAX_M={GEMV_MAX_M} tokens, got M={m}")
    y = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return y
    has_out = x_out is not None and x_out.shape[1] > 0
    ko = x_out.shape[1] if has_out else 0
    dummy = w_packed                            # never read when the matching flag is off
    args = (x_q, x_scale, w_packed, w_scale, x_out if has_out else dummy,
            w_out if has_out else dummy, bias if bias is not None else dummy, y,
            m, n, k, w_packed.shape[1], ko, _pow2_at_least(m),
            x_q.stride(0), w_packed.stride(0), w_scale.stride(0),
            x_out.stride(0) if has_out else 0, w_out.stride(0) if has_out else 0, y.stride(0))
    meta = dict(BLOCK_K=block_k, GROUP=group_size, HAS_OUT=has_out, HAS_BIAS=bias is not None,
                BKO=min(64, _pow2_at_least(max(ko, 16))), BM=_pow2_at_least(m))

    def grid(cfg):
        return (triton.cdiv(n, cfg["BN"]),)

    if config is None:     # a shipped / remembered config, else autotune once (mixq.kernels.tuned)
        key = (_pow2_at_least(m), n, k, block_k, group_size, ko, x_q.dtype, x_scale.dtype,
               w_scale.dtype, out_dtype, bias is not None)
        tuned.launch("w4a4_gemv_q", key, _tuner(block_k // 2, group_size), _w4a4_gemv_kernel,
                     grid, args, meta, x_q.device)
    else:
        tuned.run_config(_w4a4_gemv_kernel, grid, args, meta, config)
    return y
