"""Triton kernel: W4A4 GEMM on int8 tensor cores, with the FP16 outlier path fused in.

Math (one output tile; per-group scales: sum over groups j of g columns, per channel: one
group of all Kq columns), identical in order to `mixq.reference.w4a4_linear`::

    acc_j[m, n] = sum_{k in group j} x_q[m, k] * w_q[n, k]          int32, exact
    y[m, n]     = sum_j float(acc_j[m, n]) * w_scale[n, j]          fp32, j ascending
    y[m, n]     = y[m, n] * x_scale[m]
    y[m, n]    += sum_k x_out[m, k] * w_out[n, k]                   fp16 x fp16 -> fp32 (outliers)
    y[m, n]    += bias[n]
    out         = y.to(out_dtype)                                   bf16 by default

How it runs on the tensor cores
-------------------------------
The kernel computes tiles of ``Y^T`` (weights x tokens), so the int4 weights are operand **A**
of ``tl.dot``. On Hopper, ``wgmma`` can take A from registers: the packed bytes are copied
global -> shared memory by the software pipeline, read into registers in the dot-operand
layout, unpacked there with two bit operations and fed to ``wgmma`` directly, while the
activations (operand B) stay on the plain shared-memory path. Nothing unpacked is written
back to shared or global memory.

The unpack needs no shifts back down and no interleave, thanks to two choices:

* **x16 trick.** A packed byte ``b`` holds two signed nibbles. ``(b << 4)`` and ``(b & 0xF0)``,
  read as int8, are exactly ``16 * lo`` and ``16 * hi`` (two's complement: the nibble's sign bit
  lands on bit 7). The int32 accumulator then holds ``16 * acc``; ``acc >> 4`` is exact (no
  overflow while ``16 * K * 128 * 8 < 2^31``, i.e. K < 131072).
* **Pre-shuffled weights** (`prepare_w4a4_weight`). Within each block of ``block_k`` columns,
  byte ``j`` holds column ``j`` (low nibble) and column ``j + block_k/2`` (high nibble)::

      packed[n, b*block_k/2 + j] = (q[n, b*block_k + j] & 0xF)
                                 | (q[n, b*block_k + block_k/2 + j] & 0xF) << 4

  so the low nibbles of one block multiply the contiguous activation columns
  ``[b*block_k, b*block_k + block_k/2)`` and the high nibbles the next half: two ``tl.dot``
  calls per block, no ``join``/``interleave`` (which would push the operand through shared
  memory). Same int4 storage (N * Kpad / 2 bytes), different byte order from the plain
  low-nibble-first layout of `mixq.quant.pack_int4` used by the W4A16 kernel; K is padded
  with zero nibbles to a multiple of ``block_k``.

Activations are an **int8 operand** (``x_q`` int8 (M, Kq), one int4 value per byte, as the
act-quant kernel writes them unpacked): activations are transient and small next to weights
(M * Kq bytes vs N * Kq / 2), and keeping them int8 keeps them on the zero-copy
shared-memory path of ``wgmma``. The kernel is exact for any int8 activation values, so
int4 and int8 (W4A8) activations both work; the bench counts these bytes.

The FP16 outlier channels are extra K-steps of the same program: after the int4 main loop the
int32 accumulator is scaled into fp32, and ``x_out @ w_out^T`` (fp16 ``wgmma``, fp32
accumulation) accumulates straight into that fp32 tile before the one store, so the output is
written once. Up to 128 outlier channels are one masked step; more go in 64-wide steps.

K tails. With outliers split off, Kq (e.g. 4096 - 48 = 4048) is usually not a multiple of
``block_k``. ``x_q`` may therefore have either Kq columns or the prepared weight's Kpad columns
(the padded weight columns are zero, so whatever the pad codes are they add nothing; the
act-quant kernel writes zeros there with ``act_quant(..., pad_to=block_k)``, at no extra cost).
The main loop only runs full, unmasked blocks. With a Kq-column ``x_q``, M >= 128 is zero-padded
to Kpad by the launcher (a copy) and smaller M peel the last partial block into one masked step.
Measured on the H100 (Llama-3-8B shapes, M = 2048, 1% outliers): the padding copy plus the
outlier step cost 11-49% over the plain kernel, a pre-padded ``x_q`` 4-7%
(scripts/KERNEL_NOTES.md, results/study/study_run1_h100.json).

Tiling and autotuning: one small config list per M regime (M <= 32, <= 1024, larger), keyed on
an M bucket, N, K and the variant flags. Configs may use a persistent grid (one program per SM
striding over the tiles in a flattened loop, so the next tile's loads overlap the epilogue).
Environment knobs: ``MIXQ_NO_AUTOTUNE=1`` (first config only, for fast CUDA test runs) and
``MIXQ_W4A4_PERSISTENT=0`` (drop persistent configs).

Small M (decode) is bound by reading weights, not by math: `w4a4_gemm` can send M <=
`mixq.kernels.w4a4_gemv.GEMV_MAX_M` tokens (default 1, env ``MIXQ_W4A4_GEMV_MAX_M``;
measured on the H100, see that constant) to the CUDA-core kernel of
`mixq.kernels.w4a4_gemv` (few weight rows per program, wide loads, same operands and weights,
the same result before the outlier term); `mixq.kernels.w4a4_decode` fuses the activation
quantization into this kernel's main loop (off by default in `mixq.nn.W4A4Linear`).

Public API
----------
* `prepare_w4a4_weight(w, in_features=None, *, block_k=128)` -> uint8 (N, Kpad/2) shuffled.
* `unprepare_w4a4_weight(w_packed, in_features, *, block_k=128)` -> int8 (N, Kq) (inverse).
* `w4a4_gemm(x_q, x_scale, w_packed, w_scale, ...)` -> (M, N) out_dtype (torch op
  ``torch.ops.mixq.w4a4_gemm``).
* `w4a4_int_accum(x_q, w_packed, *, block_k=128)` -> int32 (M, N), the exact integer
  accumulator (debug mode; equals `mixq.reference.int_matmul`).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mixq.kernels import tuned, w4a4_gemv
from mixq.kernels._triton import (autotune, autotune_configs, check_kernel_device,
                                  check_same_device, fallback_to_reference, interpret_mode,
                                  m_bucket, op_name, round_up)
from mixq.validation import check_tensor

__all__ = ["W4A4_BLOCK_K", "prepare_w4a4_weight", "unprepare_w4a4_weight", "w4a4_gemm",
           "w4a4_int_accum", "padded_in_features", "MAX_K"]

W4A4_BLOCK_K = 128
"""Default shuffle block of `prepare_w4a4_weight` (= unpacked K consumed per main-loop step)."""

MAX_K = 131072
"""Largest Kq: the x16 int32 accumulator is exact while 16 * K * 128 * 8 < 2^31."""

_BLOCK_KS = (64, 128, 256)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_OUTLIER_DTYPES = (torch.float16, torch.bfloat16)

# ------------------------------------------------------------------------------------------
# Autotune lists, one per M regime (BM = tokens per tile = wgmma N, BN = weight rows = wgmma M;
# wgmma needs BN % 64 == 0 and BM % 8 == 0). The first entry is the one the interpreter runs.
# ------------------------------------------------------------------------------------------


def _cfg(bm: int, bn: int, warps: int, stages: int, persistent: bool = False) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn, "PERSISTENT": persistent}, num_warps=warps,
                         num_stages=stages)


_CONFIGS_SMALL = [_cfg(16, 64, 4, 4), _cfg(16, 128, 4, 4), _cfg(16, 128, 8, 5),
                  _cfg(16, 256, 8, 4), _cfg(32, 128, 4, 4)]
_CONFIGS_MEDIUM = [_cfg(64, 128, 4, 4), _cfg(128, 128, 4, 4), _cfg(128, 128, 8, 4),
                   _cfg(64, 256, 8, 3), _cfg(128, 256, 8, 3), _cfg(64, 64, 4, 4)]
_CONFIGS_LARGE = [_cfg(128, 128, 8, 4), _cfg(128, 128, 4, 4), _cfg(256, 128, 8, 4),
                  _cfg(128, 256, 8, 3), _cfg(128, 128, 4, 3), _cfg(128, 128, 8, 4, True)]


def _tune_list(configs: list) -> list:
    """The autotune list actually used. Environment knobs (GPU runs only; the interpreter always
    takes the first config): MIXQ_NO_AUTOTUNE=1 keeps only the first config (fast CUDA test
    runs, see `_triton.autotune_configs`); MIXQ_W4A4_PERSISTENT=0 drops the persistent-grid
    configs."""
    if os.environ.get("MIXQ_W4A4_PERSISTENT", "1").strip() == "0":
        configs = [c for c in configs if not c.kwargs["PERSISTENT"]]
    return autotune_configs(configs)


# ------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------


@triton.jit
def _unpack_lo(w, USE_ASM: tl.constexpr):
    """16 * (low signed nibble) of each uint8, as int8."""
    if USE_ASM:
        # Four bytes per 32-bit register: 2 instructions unpack 4 values.
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }",
            "=r,r", [w], dtype=tl.int8, is_pure=True, pack=4)
    return (w << 4).to(tl.int8, bitcast=True)


@triton.jit
def _unpack_hi(w, USE_ASM: tl.constexpr):
    """16 * (high signed nibble) of each uint8, as int8."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [w], dtype=tl.int8, is_pure=True, pack=4)
    return (w & 0xF0).to(tl.int8, bitcast=True)


@triton.jit
def _int4_block(acc, w_ptrs, x_ptrs, p0, K, offs_p,
                HALF: tl.constexpr, MASK_K: tl.constexpr, USE_ASM: tl.constexpr):
    """acc (BN, BM) int32 += 16 * W_block @ X_block^T for the shuffle block at packed column p0."""
    w = tl.load(w_ptrs + p0)                                   # (BN, HALF) uint8
    k_lo = 2 * p0                                              # first column of the block
    if MASK_K:                                                 # x_q has K columns, W is padded
        x_lo = tl.load(x_ptrs + k_lo, mask=(k_lo + offs_p)[None, :] < K, other=0)
        x_hi = tl.load(x_ptrs + (k_lo + HALF), mask=(k_lo + HALF + offs_p)[None, :] < K, other=0)
    else:
        x_lo = tl.load(x_ptrs + k_lo)                          # (BM, HALF) int8
        x_hi = tl.load(x_ptrs + (k_lo + HALF))
    acc = tl.dot(_unpack_lo(w, USE_ASM), tl.trans(x_lo), acc, out_dtype=tl.int32)
    acc = tl.dot(_unpack_hi(w, USE_ASM), tl.trans(x_hi), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _tile_ids(tile, M, BM: tl.constexpr, BN: tl.constexpr):
    """(token offsets, weight-row offsets) of tile `tile`; tokens vary fastest, so the programs
    in flight share weight tiles and re-read the small x from L2."""
    num_m = tl.cdiv(M, BM)
    offs_m = (tile % num_m) * BM + tl.arange(0, BM)
    offs_n = (tile // num_m) * BN + tl.arange(0, BN)
    return offs_m, offs_n


@triton.jit
def _w4a4_tile(tile, x_ptr, xs_ptr, w_ptr, ws_ptr, xo_ptr, wo_ptr, b_ptr, y_ptr,
               M, N, K, KP, KO,
               stride_xm, stride_wn, stride_wsn, stride_xom, stride_won, stride_ym,
               BLOCK_K: tl.constexpr, GROUP: tl.constexpr, HAS_OUT: tl.constexpr,
               HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr, K_TAIL: tl.constexpr,
               USE_ASM: tl.constexpr, BKO: tl.constexpr, OUT_LOOP: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr):
    """Compute and store one (BN weight rows) x (BM tokens) tile of Y^T."""
    HALF: tl.constexpr = BLOCK_K // 2
    offs_m, offs_n = _tile_ids(tile, M, BM, BN)
    rows_n = tl.minimum(offs_n, N - 1)       # clamp instead of masking: tails are never stored
    rows_m = tl.minimum(offs_m, M - 1)
    offs_p = tl.arange(0, HALF)
    w_ptrs = w_ptr + rows_n[:, None].to(tl.int64) * stride_wn + offs_p[None, :]
    x_ptrs = x_ptr + rows_m[:, None].to(tl.int64) * stride_xm + offs_p[None, :]

    if GROUP == 0:
        # Full shuffle blocks without masks; the last, partial block (K % BLOCK_K) is peeled.
        acc = tl.zeros((BN, BM), dtype=tl.int32)
        kp_full = (K // BLOCK_K) * HALF
        for p0 in range(0, kp_full, HALF):
            acc = _int4_block(acc, w_ptrs, x_ptrs, p0, K, offs_p, HALF, False, USE_ASM)
        if K_TAIL:
            acc = _int4_block(acc, w_ptrs, x_ptrs, kp_full, K, offs_p, HALF, True, USE_ASM)
        if INT_OUT:
            out = acc >> 4
        else:
            ws = tl.load(ws_ptr + rows_n * stride_wsn).to(tl.float32)
            out = (acc >> 4).to(tl.float32) * ws[:, None]
    else:
        # Per group (INT_OUT is never set here; BLOCK_K divides GROUP divides K, so no tail):
        # an exact int32 partial per group, scaled and summed in group order like the reference.
        out = tl.zeros((BN, BM), dtype=tl.float32)
        for g0 in range(0, KP, GROUP // 2):
            part = tl.zeros((BN, BM), dtype=tl.int32)
            for s in tl.static_range(GROUP // BLOCK_K):
                part = _int4_block(part, w_ptrs, x_ptrs, g0 + s * HALF, K, offs_p,
                                   HALF, False, USE_ASM)
            ws = tl.load(ws_ptr + rows_n * stride_wsn + (2 * g0) // GROUP).to(tl.float32)
            out += (part >> 4).to(tl.float32) * ws[:, None]

    if not INT_OUT:
        xs = tl.load(xs_ptr + rows_m).to(tl.float32)
        out = out * xs[None, :]
        if HAS_OUT:
            # FP16 outlier channels: extra K-steps into the same fp32 tile. Up to 128 channels
            # it is one masked step (no loop, so a persistent tile body keeps a single inner
            # loop that Triton can flatten); more go in 64-wide steps, not software-pipelined
            # (no extra shared-memory stages next to the main loop's).
            offs_o = tl.arange(0, BKO)
            wo_ptrs = wo_ptr + rows_n[:, None].to(tl.int64) * stride_won + offs_o[None, :]
            xo_ptrs = xo_ptr + rows_m[:, None].to(tl.int64) * stride_xom + offs_o[None, :]
            if OUT_LOOP:
                for o0 in tl.range(0, KO, BKO, num_stages=1):
                    omask = (o0 + offs_o)[None, :] < KO
                    wo = tl.load(wo_ptrs + o0, mask=omask, other=0.0)
                    xo = tl.load(xo_ptrs + o0, mask=omask, other=0.0)
                    out = tl.dot(wo, tl.trans(xo), out)
            else:
                omask = offs_o[None, :] < KO
                wo = tl.load(wo_ptrs, mask=omask, other=0.0)
                xo = tl.load(xo_ptrs, mask=omask, other=0.0)
                out = tl.dot(wo, tl.trans(xo), out)
        if HAS_BIAS:
            bias = tl.load(b_ptr + rows_n).to(tl.float32)
            out = out + bias[:, None]

    # Recompute the offsets here (cheap) rather than keep them alive across the main loop.
    offs_m, offs_n = _tile_ids(tile, M, BM, BN)
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w4a4_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, xo_ptr, wo_ptr, b_ptr, y_ptr,
                 M, N, K, KP, KO,
                 stride_xm, stride_wn, stride_wsn, stride_xom, stride_won, stride_ym,
                 M_BUCKET, NUM_PROGS,
                 BLOCK_K: tl.constexpr, GROUP: tl.constexpr, HAS_OUT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr, K_TAIL: tl.constexpr,
                 USE_ASM: tl.constexpr, BKO: tl.constexpr, OUT_LOOP: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, PERSISTENT: tl.constexpr):
    """Y^T tiles. Grid: one program per tile, or NUM_PROGS persistent programs (PERSISTENT)
    striding over the tiles in one flattened loop, so the next tile's loads are issued while
    the current tile's epilogue runs."""
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS, flatten=True):
            _w4a4_tile(tile, x_ptr, xs_ptr, w_ptr, ws_ptr, xo_ptr, wo_ptr, b_ptr, y_ptr,
                       M, N, K, KP, KO,
                       stride_xm, stride_wn, stride_wsn, stride_xom, stride_won, stride_ym,
                       BLOCK_K, GROUP, HAS_OUT, HAS_BIAS, INT_OUT, K_TAIL, USE_ASM, BKO, OUT_LOOP,
                       BM, BN)
    else:
        _w4a4_tile(tl.program_id(0), x_ptr, xs_ptr, w_ptr, ws_ptr, xo_ptr, wo_ptr, b_ptr, y_ptr,
                   M, N, K, KP, KO,
                   stride_xm, stride_wn, stride_wsn, stride_xom, stride_won, stride_ym,
                   BLOCK_K, GROUP, HAS_OUT, HAS_BIAS, INT_OUT, K_TAIL, USE_ASM, BKO, OUT_LOOP,
                       BM, BN)


_KEY = ["M_BUCKET", "N", "K", "BLOCK_K", "GROUP", "HAS_OUT", "INT_OUT"]
_PAD_X_MIN_M = 128      # from this M on, a K tail is zero-padded on x_q instead of peeled
_MAX_SINGLE_OUT = 128   # up to this many outlier channels: one masked fp16 step
_kernel_small = autotune(_tune_list(_CONFIGS_SMALL), key=_KEY)(_w4a4_kernel)
_kernel_medium = autotune(_tune_list(_CONFIGS_MEDIUM), key=_KEY)(_w4a4_kernel)
_kernel_large = autotune(_tune_list(_CONFIGS_LARGE), key=_KEY)(_w4a4_kernel)


def _pick_kernel(m: int):
    if m <= 32:
        return _kernel_small
    if m <= 1024:
        return _kernel_medium
    return _kernel_large


_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (persistent grid size); 4 under the interpreter."""
    if device.type != "cuda":
        return 4
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def _use_asm(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and not interpret_mode()


def padded_in_features(in_features: int, block_k: int = W4A4_BLOCK_K) -> int:
    """Kpad: `in_features` rounded up to a multiple of `block_k` (the prepared weight's K)."""
    return round_up(in_features, block_k)


def _launch(x_q, x_scale, w_packed, w_scale, group_size, block_k, x_out, w_out, bias,
            out_dtype, int_out: bool, *, config: triton.Config | None = None,
            use_asm: bool | None = None) -> torch.Tensor:
    """Launch the kernel (inputs already validated). `config` bypasses autotuning and
    `use_asm` overrides the unpack implementation (tests and the design study)."""
    m, k = x_q.shape
    n = w_packed.shape[0]
    y = torch.empty((m, n), dtype=torch.int32 if int_out else out_dtype, device=x_q.device)
    if m == 0:
        return y
    kpad = padded_in_features(k, block_k)
    if kpad != k and m >= _PAD_X_MIN_M:
        # Zero-pad x_q to the weight's Kpad (the padded weight columns are zero too): one cheap
        # copy instead of an un-pipelined tail step in every output tile.
        x_q = torch.nn.functional.pad(x_q, (0, kpad - k))
        k = kpad
    has_out = x_out is not None and x_out.shape[1] > 0
    ko = x_out.shape[1] if has_out else 0
    out_loop = ko > _MAX_SINGLE_OUT
    bko = 64 if out_loop else max(16, 1 << max(0, ko - 1).bit_length())
    dummy = w_packed    # never read when the matching constexpr flag is off
    num_progs = _num_sms(x_q.device)

    def grid(meta):
        tiles = triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"])
        return (min(tiles, num_progs) if meta["PERSISTENT"] else tiles,)

    args = (x_q, x_scale if x_scale is not None else dummy, w_packed,
            w_scale if w_scale is not None else dummy,
            x_out if has_out else dummy, w_out if has_out else dummy,
            bias if bias is not None else dummy, y,
            m, n, k, w_packed.shape[1], ko,
            x_q.stride(0), w_packed.stride(0),
            w_scale.stride(0) if w_scale is not None else 0,
            x_out.stride(0) if has_out else 0, w_out.stride(0) if has_out else 0, y.stride(0),
            m_bucket(m), num_progs)
    meta = dict(BLOCK_K=block_k, GROUP=group_size or 0, HAS_OUT=has_out,
                HAS_BIAS=bias is not None, INT_OUT=int_out, K_TAIL=(k % block_k) != 0,
                USE_ASM=_use_asm(x_q) if use_asm is None else use_asm, BKO=bko,
                OUT_LOOP=out_loop)
    if config is None:     # a shipped / remembered config, else autotune once (mixq.kernels.tuned)
        key = (m_bucket(m), n, k, block_k, group_size or 0, has_out, int_out, out_dtype)
        tuned.launch("w4a4", key, _pick_kernel(m), _w4a4_kernel, grid, args, meta, x_q.device)
    else:
        tuned.run_config(_w4a4_kernel, grid, args, meta, config)
    return y


# ------------------------------------------------------------------------------------------
# torch custom ops (opaque to torch.compile; shapes come from the fake implementations)
# ------------------------------------------------------------------------------------------


def _w4a4_gemm_impl(x_q, x_scale, w_packed, w_scale, group_size, block_k, x_out, w_out, bias,
                    out_dtype):
    if 0 < x_q.shape[0] <= w4a4_gemv.GEMV_MAX_M and w4a4_gemv.takes_weight(w_packed):   # decode
        return w4a4_gemv.w4a4_gemv(x_q, x_scale, w_packed, w_scale, group_size, block_k,
                                   x_out, w_out, bias, out_dtype)
    return _launch(x_q, x_scale, w_packed, w_scale, group_size, block_k, x_out, w_out, bias,
                   out_dtype, int_out=False)


@torch.library.custom_op(op_name("w4a4_gemm"), mutates_args=())
def _w4a4_gemm_op(x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor,
                  w_scale: torch.Tensor, group_size: int, block_k: int,
                  x_out: torch.Tensor | None, w_out: torch.Tensor | None,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return _w4a4_gemm_impl(x_q, x_scale, w_packed, w_scale, group_size, block_k, x_out, w_out,
                           bias, out_dtype)


@_w4a4_gemm_op.register_fake
def _(x_q, x_scale, w_packed, w_scale, group_size, block_k, x_out, w_out, bias, out_dtype):
    return x_q.new_empty((x_q.shape[0], w_packed.shape[0]), dtype=out_dtype)


@torch.library.custom_op(op_name("w4a4_int_accum"), mutates_args=())
def _w4a4_int_accum_op(x_q: torch.Tensor, w_packed: torch.Tensor, block_k: int) -> torch.Tensor:
    return _launch(x_q, None, w_packed, None, 0, block_k, None, None, None, torch.int32,
                   int_out=True)


@_w4a4_int_accum_op.register_fake
def _(x_q, w_packed, block_k):
    return x_q.new_empty((x_q.shape[0], w_packed.shape[0]), dtype=torch.int32)


# ------------------------------------------------------------------------------------------
# Weight preparation (offline)
# ------------------------------------------------------------------------------------------


def _check_block_k(block_k) -> int:
    if isinstance(block_k, bool) or not isinstance(block_k, int) or block_k not in _BLOCK_KS:
        raise ValueError(f"block_k must be one of {_BLOCK_KS}, got {block_k!r}")
    return block_k


def prepare_w4a4_weight(w: torch.Tensor, in_features: int | None = None, *,
                        block_k: int = W4A4_BLOCK_K) -> torch.Tensor:
    """Re-lay int4 weights into the pre-shuffled W4A4 layout (offline, pure PyTorch, any device).

    Layout (Kpad = `padded_in_features(Kq, block_k)`, h = block_k / 2, missing columns = 0)::

        out[n, b*h + j] = (q[n, b*block_k + j] & 0xF) | (q[n, b*block_k + h + j] & 0xF) << 4

    Args:
        w: either int8 (N, Kq) int4 values in [-8, 7], or uint8 (N, ceil(Kq/2)) packed with
            `mixq.quant.pack_int4` (low nibble first; then `in_features` = Kq is required).
        in_features: Kq, the number of int4 columns (inferred for int8 input).
        block_k: shuffle block, one of 64, 128 (default), 256; pass the same to `w4a4_gemm`.
            For per-group scales it must divide the group size.
    Returns:
        uint8 (N, Kpad / 2), contiguous, on `w`'s device.
    Raises:
        TypeError: wrong dtype. ValueError: wrong shape, values out of range, bad block_k.
    """
    from mixq.quant import pack_int4_blocked, unpack_int4

    block_k = _check_block_k(block_k)
    check_tensor(w, "w", ndim=2, dtypes=(torch.int8, torch.uint8))
    if w.dtype == torch.int8:
        if in_features is not None and in_features != w.shape[1]:
            raise ValueError(f"in_features={in_features} does not match int8 w of shape "
                             f"{tuple(w.shape)} (N, Kq)")
        q = w
    else:
        if in_features is None:
            raise ValueError("in_features (Kq) is required for packed uint8 w "
                             f"of shape {tuple(w.shape)}")
        q = unpack_int4(w, int(in_features), signed=True)
    return pack_int4_blocked(q, block_k)        # validates the int4 range


def unprepare_w4a4_weight(w_packed: torch.Tensor, in_features: int, *,
                          block_k: int = W4A4_BLOCK_K) -> torch.Tensor:
    """Inverse of `prepare_w4a4_weight`: uint8 (N, Kpad/2) -> int8 (N, Kq) values in [-8, 7]."""
    from mixq.quant import unpack_int4_blocked

    return unpack_int4_blocked(w_packed, int(in_features), _check_block_k(block_k))


# ------------------------------------------------------------------------------------------
# Public launchers
# ------------------------------------------------------------------------------------------


def _check_int_operands(x_q, w_packed, block_k) -> tuple[int, int, int]:
    check_tensor(x_q, "x_q", ndim=2, dtypes=(torch.int8,), nonempty=False, contiguous=True)
    check_tensor(w_packed, "w_packed", ndim=2, dtypes=(torch.uint8,), contiguous=True)
    check_kernel_device(x_q, "x_q")
    check_kernel_device(w_packed, "w_packed")
    block_k = _check_block_k(block_k)
    m, k = x_q.shape
    n = w_packed.shape[0]
    if k < 1:
        raise ValueError(f"x_q must have at least one column, got shape {tuple(x_q.shape)}")
    if k > MAX_K:
        raise ValueError(f"x_q has K={k} columns; the exact int32 accumulator allows K <= {MAX_K}")
    kpad = padded_in_features(k, block_k)
    if w_packed.shape[1] != kpad // 2:
        raise ValueError(
            f"w_packed (N, Kpad/2) must have Kpad/2 = {kpad // 2} columns for x_q (M, K) with "
            f"K={k} and block_k={block_k} (see prepare_w4a4_weight), got shape "
            f"{tuple(w_packed.shape)}")
    return m, n, k


def w4a4_int_accum(x_q: torch.Tensor, w_packed: torch.Tensor, *,
                   block_k: int = W4A4_BLOCK_K) -> torch.Tensor:
    """Debug mode of the W4A4 kernel: the exact int32 accumulator ``x_q @ w_q^T``.

    Runs the same main loop as `w4a4_gemm` (same unpack, same tensor-core path) and stores the
    integer accumulator instead of scaling it; equals ``mixq.reference.int_matmul(x_q, w_q)``
    bit for bit.

    Args:
        x_q: int8 (M, Kq) contiguous activations (any int8 values; int4 in [-8, 7] for W4A4).
        w_packed: uint8 (N, Kpad/2) from ``prepare_w4a4_weight(w_q, block_k=block_k)``.
        block_k: the shuffle block used to prepare `w_packed`.
    Returns:
        int32 (M, N).
    """
    _check_int_operands(x_q, w_packed, block_k)
    check_same_device({"x_q": x_q, "w_packed": w_packed})
    return _w4a4_int_accum_op(x_q, w_packed, block_k)


def w4a4_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor,
              w_scale: torch.Tensor, *, group_size: int | None = None,
              block_k: int = W4A4_BLOCK_K, x_out: torch.Tensor | None = None,
              w_out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.bfloat16, validate: bool = True) -> torch.Tensor:
    """W4A4 GEMM with fused FP16 outliers: ``y = (x_q @ w_q^T) * scales + x_out @ w_out^T + bias``.

    See the module docstring for the exact math (it matches `mixq.reference.w4a4_linear` given
    the same ``x_q, x_scale``: bit for bit before the outlier term, to fp32 rounding after it).

    Args:
        x_q: int8 (M, Kq) or (M, Kpad) contiguous, the quantized int4 part of the activations
            (values in [-8, 7]; one value per byte as written by the act-quant kernel, Kpad
            columns with ``pad_to=block_k``: no tail step, no padding copy).
        x_scale: (M, 1) or (M,) fp16/bf16/fp32 per-token scales.
        w_packed: uint8 (N, Kpad/2) contiguous, from `prepare_w4a4_weight(..., block_k=block_k)`.
        w_scale: (N, 1) per output channel (group_size None) or (N, Kq // group_size) per
            group; fp16/bf16/fp32.
        group_size: None (per channel) or g with g | Kq and block_k | g (e.g. 128).
        block_k: the shuffle block `w_packed` was prepared with (64, 128 or 256).
        x_out: optional (M, k) fp16/bf16 outlier activations (k >= 0 channels kept in float).
        w_out: optional (N, k) same dtype as `x_out`, the outlier weight columns.
        bias: optional (N,) float.
        out_dtype: torch.bfloat16 (default), torch.float16 or torch.float32.
        validate: False skips every check (callers that validated the operands at build
            time, on a GPU the kernel supports: `mixq.nn.W4A4Linear`); `x_scale` must then be
            contiguous with M elements.
    Returns:
        (M, N) tensor of `out_dtype`.
    Raises:
        TypeError: a wrong dtype. ValueError: wrong shapes, non-contiguous operands, mixed or
            unsupported devices, group_size not compatible with Kq / block_k.
    """
    # the custom op makes the kernel traceable by torch.compile; eager calls skip its dispatch
    impl = _w4a4_gemm_op if torch.compiler.is_compiling() else _w4a4_gemm_impl
    if not validate:
        return impl(x_q, x_scale.reshape(-1), w_packed, w_scale, group_size or 0, block_k,
                    x_out, w_out, bias, out_dtype)
    m, n, k = _check_int_operands(x_q, w_packed, block_k)
    check_tensor(x_scale, "x_scale", ndim=(1, 2), dtypes=_SCALE_DTYPES, nonempty=False)
    if x_scale.numel() != m or (x_scale.dim() == 2 and x_scale.shape[1] != 1):
        raise ValueError(f"x_scale must have shape (M, 1) or (M,) with M={m}, "
                         f"got {tuple(x_scale.shape)}")
    x_scale = x_scale.reshape(m)
    if not x_scale.is_contiguous():
        raise ValueError(f"x_scale must be contiguous, got stride {x_scale.stride()}")
    check_tensor(w_scale, "w_scale", ndim=2, dtypes=_SCALE_DTYPES)
    if w_scale.stride(1) != 1:
        raise ValueError(f"w_scale must have unit stride along its last dim, got stride "
                         f"{w_scale.stride()}")
    if group_size is None:
        if tuple(w_scale.shape) != (n, 1):
            raise ValueError(f"w_scale must have shape (N, 1) = ({n}, 1) for per-channel scales "
                             f"(group_size=None), got {tuple(w_scale.shape)}")
    else:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise TypeError(f"group_size must be a positive int or None, got {group_size!r}")
        if k % group_size:
            raise ValueError(f"group_size={group_size} must divide K={k} of x_q "
                             f"{tuple(x_q.shape)}")
        if group_size % block_k:
            raise ValueError(f"group_size={group_size} must be a multiple of block_k={block_k}; "
                             f"prepare the weight with a block_k that divides the group size")
        if tuple(w_scale.shape) != (n, k // group_size):
            raise ValueError(f"w_scale must have shape (N, K // group_size) = "
                             f"({n}, {k // group_size}), got {tuple(w_scale.shape)}")
    if (x_out is None) != (w_out is None):
        raise ValueError("x_out and w_out go together: pass both (the FP16 outlier path) or "
                         "neither")
    if x_out is not None:
        check_tensor(x_out, "x_out", ndim=2, dtypes=_OUTLIER_DTYPES, nonempty=False,
                     contiguous=True)
        check_tensor(w_out, "w_out", ndim=2, dtypes=_OUTLIER_DTYPES, nonempty=False,
                     contiguous=True)
        if x_out.dtype != w_out.dtype:
            raise TypeError(f"x_out and w_out must share a dtype, got {x_out.dtype} and "
                            f"{w_out.dtype}")
        if x_out.shape[0] != m or w_out.shape[0] != n or x_out.shape[1] != w_out.shape[1]:
            raise ValueError(f"x_out must be (M, k) and w_out (N, k) with M={m}, N={n}; got "
                             f"{tuple(x_out.shape)} and {tuple(w_out.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=_SCALE_DTYPES, contiguous=True)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape (N,) = ({n},), got {tuple(bias.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in _OUT_DTYPES]}, "
                        f"got {out_dtype}")
    check_same_device({"x_q": x_q, "x_scale": x_scale, "w_packed": w_packed,
                       "w_scale": w_scale, "x_out": x_out, "w_out": w_out, "bias": bias})
    if fallback_to_reference(x_q, "w4a4_gemm"):
        return _reference_gemm(x_q, x_scale, w_packed, w_scale, group_size, block_k,
                               x_out, w_out, bias).to(out_dtype)
    return impl(x_q, x_scale, w_packed, w_scale, group_size or 0, block_k, x_out, w_out, bias,
                out_dtype)


def _reference_gemm(x_q, x_scale, w_packed, w_scale, group_size, block_k, x_out, w_out, bias):
    """fp32 result of the kernel's math in plain PyTorch (GPUs without int8 tensor cores)."""
    from mixq.reference import int_matmul

    k = x_q.shape[1]
    w_q = unprepare_w4a4_weight(w_packed, k, block_k=block_k)
    g = group_size or k
    y = torch.zeros(x_q.shape[0], w_q.shape[0], dtype=torch.float32, device=x_q.device)
    for j in range(k // g):
        cols = slice(j * g, (j + 1) * g)
        y = y + int_matmul(x_q[:, cols], w_q[:, cols]).float() * w_scale[:, j].float()
    y = y * x_scale.float().reshape(-1, 1)
    if x_out is not None and x_out.shape[1] > 0:
        y = y + x_out.float() @ w_out.float().T
    if bias is not None:
        y = y + bias.float()
    return y
