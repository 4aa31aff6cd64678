"""Study (H100): a W4A16 decode kernel on the W4A4 main loop.

    python scripts/gpu_study_w4a16.py OUT_DIR

Hypothesis (scripts/KERNEL_NOTES.md, runs 5 and 8): the W4A16 decode kernels are bound by the
dequantization arithmetic (~6 integer/float ops per weight for shifts, joins, magic-number
conversion), while the W4A4 kernel streams the same int4 bytes at ~3x bf16 on gate_up with a
2-op unpack per 4 weights. So: W4A4's pre-shuffled layout and asm unpack (16*v as int8), one
int8 -> bf16 conversion per weight, the weight tile as the register operand of a bf16 MMA
against the activation halves, exact integer-valued operands and the g=128 scale applied per
block after the MMA; split-K by fp32 atomics (y pre-zeroed, included in the timing).
"""
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

from mixq.experiments.common import Timing, cuda_time_ms
from mixq.kernels import w4a4 as W
from mixq.kernels import w4a16 as W16
from mixq.quant import pack_int4

OUT = sys.argv[1]
DRY = os.environ.get("STUDY_DRY") == "1"
DEV = "cpu" if DRY else "cuda"
TIMING = Timing(warmup_ms=10, rep_ms=40)
ROWS = []
T0 = time.time()


@triton.jit
def _w4a16_w4a4_loop_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, KP, NG, stride_xm, stride_wn,
                            USE_ASM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            SPLIT_K: tl.constexpr, PLAIN: tl.constexpr):
    HALF: tl.constexpr = 64
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    rows_n = tl.minimum(offs_n, N - 1)
    rows_m = tl.minimum(offs_m, M - 1)
    offs_p = tl.arange(0, HALF)
    w_ptrs = w_ptr + rows_n[:, None].to(tl.int64) * stride_wn + offs_p[None, :]
    if PLAIN:   # pack_int4 layout: byte j = columns 2j (low nibble) and 2j + 1 (high nibble)
        x_ptrs = x_ptr + rows_m[:, None].to(tl.int64) * stride_xm + 2 * offs_p[None, :]
    else:       # W4A4 layout: byte j of a 128-column block = columns j and j + 64
        x_ptrs = x_ptr + rows_m[:, None].to(tl.int64) * stride_xm + offs_p[None, :]
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    blocks = KP // HALF
    per = tl.cdiv(blocks, SPLIT_K)
    b_lo = pid_k * per
    b_hi = tl.minimum(blocks, b_lo + per)
    for b in range(b_lo, b_hi):
        w = tl.load(w_ptrs + b * HALF)
        x_lo = tl.load(x_ptrs + b * 128)
        if PLAIN:
            x_hi = tl.load(x_ptrs + b * 128 + 1)
        else:
            x_hi = tl.load(x_ptrs + b * 128 + HALF)
        part = tl.dot(W._unpack_lo(w, USE_ASM).to(dt), tl.trans(x_lo))
        part = tl.dot(W._unpack_hi(w, USE_ASM).to(dt), tl.trans(x_hi), part)
        s = tl.load(s_ptr + rows_n * NG + (b * 128) // 128).to(tl.float32) * 0.0625
        acc += part * s[:, None]
    y_ptrs = y_ptr + offs_m[None, :] * N + offs_n[:, None]
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(y_ptrs, acc, mask=mask)


def run(x, wp, s, n, cfg, plain=False):
    bn, split, warps, stages = cfg
    m, k = x.shape
    y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, 16), split)
    _w4a16_w4a4_loop_kernel[grid](x, wp, s, y, m, n, k, wp.shape[1], k // 128, x.stride(0),
                                  wp.stride(0), USE_ASM=not DRY, BM=16, BN=bn, SPLIT_K=split,
                                  PLAIN=plain, num_warps=warps, num_stages=stages)
    return y


def timed(fn):
    if DRY:
        fn()
        return 0.0
    try:
        return cuda_time_ms([fn], TIMING)[0]
    except Exception as e:  # noqa: BLE001
        print("failed:", repr(e)[:300], flush=True)
        return None


def record(shape, m, variant, t, **extra):
    ROWS.append(dict(shape=shape, M=m, variant=variant, time_ms=t, **extra))
    print(f"[{time.time() - T0:5.0f}s] {shape:11s} M={m:3d} {variant:34s} "
          f"{'-' if t is None else f'{t:.4f}'} {extra if extra else ''}", flush=True)
    with open(os.path.join(OUT, "study_w4a16.json"), "w") as f:
        json.dump(dict(device="cpu (dry)" if DRY else torch.cuda.get_device_name(0),
                       torch=torch.__version__, triton=triton.__version__, rows=ROWS), f, indent=1)


SHAPES = {"8b.gate_up": (28672, 4096), "8b.down": (4096, 14336), "8b.o": (4096, 4096),
          "8b.qkv": (6144, 4096)}
if DRY:
    SHAPES = {"tiny": (130, 384)}
CFGS = [(64, 8, 4, 3), (128, 4, 4, 3), (64, 16, 4, 3), (64, 4, 4, 4)]   # run 5 swept 8
for shape, (n, k) in SHAPES.items():
    wq = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
    s = (torch.rand(n, k // 128, device=DEV) * 0.01 + 1e-3).half()
    wp_plain = pack_int4(wq)
    wp = W.prepare_w4a4_weight(wq)
    w_deq = wq.float() * s.float().repeat_interleave(128, dim=1)
    for m in (1, 16):
        x = torch.randn(m, k, device=DEV, dtype=torch.float16 if DRY else torch.bfloat16)  # interpreter: bf16 dot unreliable
        xb = x.clone()
        wb = w_deq.to(torch.bfloat16)
        ref = x.float() @ w_deq.T
        if not DRY:
            record(shape, m, "peer bf16", timed(lambda: xb @ wb.T))
            record(shape, m, "mixq w4a16 (current)", timed(lambda: W16.w4a16_matmul(x, wp_plain, s, 128)))
        for cfg in CFGS:
            for plain, w_in in ((False, wp), (True, wp_plain)):
                t = timed(lambda cfg=cfg, plain=plain, w_in=w_in: run(x, w_in, s, n, cfg, plain))
                y = run(x, w_in, s, n, cfg, plain)
                rel = float((y - ref).norm() / ref.norm())
                record(shape, m, ("plain-layout " if plain else "w4a4-loop ")
                       + "BN%d sk%d w%d s%d" % cfg, t, rel=rel)
print(f"done in {time.time() - T0:.0f}s", flush=True)
