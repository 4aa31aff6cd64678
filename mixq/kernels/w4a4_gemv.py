"""Triton kernel: W4A4 for a few tokens (decode) on CUDA cores, bound by the weight read.

Motivation
----------
At decode a W4A4 linear multiplies one token (M = 1, up to `MAX_M`) by an (N, K) int4
weight. The work is N * K multiply-adds -- nothing for the GPU -- but the N * K / 2 weight bytes
must stream from HBM: 8 MiB for a 4096 x 4096 layer, about 2.5 us at the H100's 3.35 TB/s.
The tensor-core GEMM of `mixq.kernels.w4a4` is the wrong shape for this: its smallest token
tile is 16 (wgmma's N), so 15/16 of the MMA work is padding, and with 64-128 weight rows per
program a 4096-row layer has 32-64 programs for 132 SMs, too few loads in flight to reach the
memory bandwidth (measured 18 us for that layer on the H100, act-quant included).

Here each program owns only a few weight rows (`BN`, 4-32) and walks the whole K, reading
`BKB` contiguous bytes per row per step (wide coalesced loads), so there are N / BN programs
(512 for N = 4096 with BN = 8) and the HBM stream stays full.

The second limit is the arithmetic. Unpacking each nibble into its own int32 and multiplying
costs about 14 integer operations per weight byte: about 8 us of ALU time for that 4096 x 4096
layer, three times its memory time (the first version of this kernel measured so). So the
kernel reads the weight as int32 words (8 nibbles) and multiplies 4 codes at once with PTX
``dp4a`` (a dot product of four byte pairs, accumulated in int32): two bit operations make
the four low (or high) nibbles of a word offset-binary bytes ``u = w_q + 8`` in [0, 15], one
``dp4a.u32.s32`` multiplies them with four activation codes, and ``8 * sum(x)`` is subtracted
once per scale group. That is about 1.5 operations per weight byte, and the products stay
exact. The int32 partial sums accumulate in a (BM, BN, BW) register tile that is reduced
once per scale group (once at the end for per-channel scales), not once per step.

Inputs are those of `mixq.kernels.w4a4.w4a4_gemm`, which sends M <= `GEMV_MAX_M` here (default 1): the
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
caller, `mixq.kernels.w4a4.w4a4_gemm`), `GEMV_MAX_M` (dispatch), `MAX_M` (capacity).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mixq.kernels import tuned
from mixq.kernels._triton import autotune, interpret_mode

__all__ = ["GEMV_MAX_M", "MAX_M", "takes_weight", "w4a4_gemv"]

MAX_M = 16
"""The most tokens one call takes (the (BM, BN, BW) register tile grows with M)."""

GEMV_MAX_M = min(MAX_M, int(os.environ.get("MIXQ_W4A4_GEMV_MAX_M", "1")))
"""`mixq.kernels.w4a4.w4a4_gemm` runs this kernel for 1 <= M <= GEMV_MAX_M tokens (env
``MIXQ_W4A4_GEMV_MAX_M`` at import, at most `MAX_M`; 0 turns it off). Default 1, measured on
the H100 (act-quant + GEMM, per-row scales, CUDA graphs, x bf16; `results/gemm_decode_h100.md`
against the tensor-core kernel of the same session, `results/gemm_decode_gemv_off_h100.md`):
at M=1 this kernel is faster on every Llama-3-8B shape (qkv 1.52x against 1.25x bf16, o 1.32x
against 1.02x, gate_up 2.66x against 2.60x, down 1.68x against 1.03x); at M=4 it loses on
gate_up (2.10x against 2.60x) and at M=16 everywhere (0.69-0.89x against 1.0-2.6x)."""


def _cfg(bn: int, bkb: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BN": bn, "BKB": bkb}, num_warps=warps, num_stages=stages)


# (weight rows per program, packed bytes per row per step): BN * BKB bytes in flight per step.
# The first entry is what the interpreter (and MIXQ_NO_AUTOTUNE=1) runs.
_CONFIGS = [_cfg(8, 256, 4, 3), _cfg(16, 256, 4, 3), _cfg(8, 512, 4, 3), _cfg(16, 512, 8, 3),
            _cfg(4, 512, 4, 4), _cfg(32, 256, 8, 3), _cfg(4, 256, 2, 4), _cfg(16, 128, 4, 4),
            _cfg(8, 128, 2, 4), _cfg(32, 128, 4, 3)]


def _bytes_per_step(bkb: int, group: int) -> int:
    """The step `bkb` (a power of two >= 16) adjusted to `group` (0: per channel): a step holds
    whole groups or a power-of-two part of one (so steps tile groups and groups tile steps)."""
    if not group:
        return bkb
    g2 = group // 2                           # packed bytes per group
    if bkb >= g2 and g2 & (g2 - 1) == 0:      # whole groups (power of two) per step
        return bkb
    while bkb > 4 and g2 % bkb:
        bkb //= 2
    return bkb


def _configs_for(half: int, group: int) -> list:
    """The configs valid for `group` (0: per channel), duplicates dropped. (`half`, the shuffle
    half-block in bytes, no longer constrains the step: each 4-byte word lies in one half.)"""
    out, seen = [], set()
    for c in _CONFIGS:
        key = (c.kwargs["BN"], _bytes_per_step(c.kwargs["BKB"], group), c.num_warps,
               c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(_cfg(*key))
    return out


@triton.jit
def _dp4a(a, b, c, USE_ASM: tl.constexpr):
    """c + sum_i a.byte[i] * b.byte[i] per int32 element: `a`'s four bytes unsigned, `b`'s
    signed (PTX ``dp4a.u32.s32``, one instruction; spelled out under the interpreter)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            c += ((a >> (8 * i)) & 0xFF) * ((((b >> (8 * i)) & 0xFF) ^ 0x80) - 0x80)
        return c


@triton.jit
def _x_words(x_rows, mmask, col, K):
    """The activation codes at columns col..col+3 of each word (`col` (BW,)) as (BM, BW) int32
    little-endian words (byte i = column col + i, zero past K), and (BM, BW) their sums."""
    offs4 = tl.arange(0, 4)
    cols = col[:, None] + offs4[None, :]                                    # (BW, 4)
    xb = tl.load(x_rows[:, :, None] + cols[None, :, :],
                 mask=mmask[:, None, None] & (cols < K)[None, :, :], other=0).to(tl.int32)
    return tl.sum((xb & 0xFF) << (8 * offs4)[None, None, :], axis=2), tl.sum(xb, axis=2)


@triton.jit
def _step(acc, xsum, w_ptrs, x_rows, mmask, w0, K, KPW, offs_w,
          BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
    """acc (BM, BN, BW) += the dp4a products of the BW weight words from word w0 (8 nibbles
    each) with their activation codes; xsum (BM, BW) += the codes' sums.

    Byte j of a shuffle block holds column j (low nibble) and j + BLOCK_K/2 (high nibble), so
    the low nibbles of a word's 4 bytes are 4 consecutive columns, and so are the high ones.
    Nibbles become offset-binary bytes ``u = w_q + 8`` in [0, 15] with two bit operations; the
    caller subtracts ``8 * sum(x)`` once per group (``sum (u - 8) x = sum u x - 8 sum x``)."""
    HALF: tl.constexpr = BLOCK_K // 2
    w = tl.load(w_ptrs + w0, mask=(w0 + offs_w)[None, :] < KPW, other=0)   # (BN, BW) int32
    u_lo = (w & 0x0F0F0F0F) ^ 0x08080808
    u_hi = ((w >> 4) & 0x0F0F0F0F) ^ 0x08080808
    byte = 4 * (w0 + offs_w)                                 # packed byte of each word's byte 0
    col = (byte // HALF) * BLOCK_K + byte % HALF             # column of its low nibble
    x_lo, s_lo = _x_words(x_rows, mmask, col, K)
    x_hi, s_hi = _x_words(x_rows, mmask, col + HALF, K)
    acc = _dp4a(u_lo[None, :, :], x_lo[:, None, :], acc, USE_ASM)
    acc = _dp4a(u_hi[None, :, :], x_hi[:, None, :], acc, USE_ASM)
    return acc, xsum + s_lo + s_hi


@triton.jit
def _w4a4_gemv_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, xo_ptr, wo_ptr, b_ptr, y_ptr,
                      M, N, K, KPW, KO, M_BUCKET,
                      stride_xm, stride_wn, stride_wsn, stride_xom, stride_won, stride_ym,
                      BLOCK_K: tl.constexpr, GROUP: tl.constexpr, HAS_OUT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BKO: tl.constexpr, BM: tl.constexpr,
                      USE_ASM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr):
    """One program: BN weight rows x all M (<= BM) tokens, the whole K. `w_ptr` is the packed
    weight read as int32 words (KPW = Kpad / 8 per row, row stride `stride_wn` words)."""
    BW: tl.constexpr = BKB // 4                                 # weight words per row per step
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    rows_n = tl.minimum(offs_n, N - 1)          # clamp instead of masking: tails never stored
    offs_m = tl.arange(0, BM)
    mmask = offs_m < M
    offs_w = tl.arange(0, BW)
    w_ptrs = w_ptr + rows_n[:, None].to(tl.int64) * stride_wn + offs_w[None, :]
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm

    if GROUP == 0:
        acc = tl.zeros((BM, BN, BW), dtype=tl.int32)
        xsum = tl.zeros((BM, BW), dtype=tl.int32)
        for w0 in range(0, KPW, BW):
            acc, xsum = _step(acc, xsum, w_ptrs, x_rows, mmask, w0, K, KPW, offs_w, BLOCK_K,
                              USE_ASM)
        dot = tl.sum(acc, axis=2) - 8 * tl.sum(xsum, axis=1)[:, None]      # exact int32
        ws = tl.load(ws_ptr + rows_n * stride_wsn).to(tl.float32)
        out = dot.to(tl.float32) * ws[None, :]
    else:
        GW: tl.constexpr = GROUP // 8                           # words per group
        NG: tl.constexpr = BW // GW if BW >= GW else 1          # groups per step ...
        SPG: tl.constexpr = GW // BW if GW > BW else 1          # ... or steps per group
        CW: tl.constexpr = NG * GW                              # words per chunk of groups
        n_groups = KPW // GW
        offs_g = tl.arange(0, NG)
        out = tl.zeros((BM, BN), dtype=tl.float32)
        for c0 in range(0, KPW, CW):
            part = tl.zeros((BM, BN, BW), dtype=tl.int32)
            xsum = tl.zeros((BM, BW), dtype=tl.int32)
            for s in tl.static_range(SPG):
                part, xsum = _step(part, xsum, w_ptrs, x_rows, mmask, c0 + s * BW, K, KPW,
                                   offs_w, BLOCK_K, USE_ASM)
            dots = tl.sum(tl.reshape(part, (BM, BN, NG, BW // NG)), axis=3)           # (BM, BN, NG)
            xg = tl.sum(tl.reshape(xsum, (BM, NG, BW // NG)), axis=2)                  # (BM, NG)
            g = c0 // GW + offs_g
            ws = tl.load(ws_ptr + rows_n[:, None] * stride_wsn + g[None, :],
                         mask=(g < n_groups)[None, :], other=0.0).to(tl.float32)       # (BN, NG)
            terms = (dots - 8 * xg[:, None, :]).to(tl.float32) * ws[None, :, :]
            for j in tl.static_range(NG):            # groups in ascending order, as the reference
                out += tl.sum(tl.where((offs_g == j)[None, None, :], terms, 0.0), axis=2)

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


def takes_weight(w_packed: torch.Tensor) -> bool:
    """Whether `w_packed` can be read as int32 words in place (unit column stride; row stride,
    width and storage offset multiples of 4 bytes). `prepare_w4a4_weight` output always can;
    `mixq.kernels.w4a4.w4a4_gemm` sends any other view to the tensor-core kernel."""
    return (w_packed.dim() == 2 and w_packed.dtype == torch.uint8
            and (w_packed.stride(1) == 1 or w_packed.shape[1] <= 1)
            and w_packed.shape[1] % 4 == 0 and w_packed.stride(0) % 4 == 0
            and w_packed.storage_offset() % 4 == 0)


def _pow2_at_least(m: int) -> int:
    return 1 << max(0, m - 1).bit_length()


def w4a4_gemv(x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor,
              w_scale: torch.Tensor, group_size: int, block_k: int,
              x_out: torch.Tensor | None, w_out: torch.Tensor | None,
              bias: torch.Tensor | None, out_dtype: torch.dtype,
              config: triton.Config | None = None) -> torch.Tensor:
    """``y = (x_q @ w_q^T) * scales + x_out @ w_out^T + bias`` for M <= `MAX_M` tokens.

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
    if m > MAX_M:
        raise ValueError(f"w4a4_gemv takes at most MAX_M={MAX_M} tokens, got M={m}")
    y = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return y
    has_out = x_out is not None and x_out.shape[1] > 0
    ko = x_out.shape[1] if has_out else 0
    if not takes_weight(w_packed):
        raise ValueError("w4a4_gemv reads the packed weight as int32 words: it needs a uint8 "
                         "(N, Kpad/2) tensor with unit column stride, and row stride, width "
                         f"and offset multiples of 4 bytes, got shape {tuple(w_packed.shape)} "
                         f"strides {w_packed.stride()} offset {w_packed.storage_offset()}")
    words = w_packed.view(torch.int32)          # (N, Kpad / 8): 8 nibbles per word, no copy
    dummy = w_packed                            # never read when the matching flag is off
    args = (x_q, x_scale, words, w_scale, x_out if has_out else dummy,
            w_out if has_out else dummy, bias if bias is not None else dummy, y,
            m, n, k, words.shape[1], ko, _pow2_at_least(m),
            x_q.stride(0), words.stride(0), w_scale.stride(0),
            x_out.stride(0) if has_out else 0, w_out.stride(0) if has_out else 0, y.stride(0))
    meta = dict(BLOCK_K=block_k, GROUP=group_size, HAS_OUT=has_out, HAS_BIAS=bias is not None,
                BKO=min(64, _pow2_at_least(max(ko, 16))), BM=_pow2_at_least(m),
                USE_ASM=not interpret_mode())

    def grid(cfg):
        return (triton.cdiv(n, cfg["BN"]),)

    if config is None:     # a shipped / remembered config, else autotune once (mixq.kernels.tuned)
        key = (_pow2_at_least(m), n, k, block_k, group_size, ko, x_q.dtype, x_scale.dtype,
               w_scale.dtype, out_dtype, bias is not None)
        tuned.launch("w4a4_gemv_dp4a", key, _tuner(block_k // 2, group_size), _w4a4_gemv_kernel,
                     grid, args, meta, x_q.device)
    else:
        tuned.run_config(_w4a4_gemv_kernel, grid, args, meta, config)
    return y
