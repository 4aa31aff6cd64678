"""Study (H100): is the act-quant kernel bound by its IEEE division?

    python scripts/gpu_study_quant.py OUT_DIR

The production kernel computes every code as round_half_even(clamp(div_rn(x, s))) to match
`mixq.reference.quantize_per_token` bit for bit. Variants (single-pass rows, int8 codes, the
last 1% of channels copied as FP16 outliers, like the bench's mixq_quant mode):

* DIV=0: div_rn per element (production).
* DIV=1: x * (1/s) (one correctly rounded reciprocal per row): not exact near half-integers.
* DIV=2: x * (1/s), and for a row where any product lies within 2^-19 * max(|r|, 1) of a
  half-integer, the row's codes are recomputed with div_rn. Exact: |x*(1/s) - x/s| is a few
  ulps, so away from a boundary both round to the same integer (and the clamp commutes).

Prints time, % of copy bandwidth and whether the codes equal DIV=0's bit for bit.
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

from mixq.experiments import bench_gemm as B
from mixq.experiments.common import Timing, cuda_time_ms
from mixq.kernels.pack import cast_rne, round_half_even

OUT = sys.argv[1]
DRY = os.environ.get("STUDY_DRY") == "1"
DEV = "cpu" if DRY else "cuda"


@triton.jit
def _codes(v):
    return round_half_even(tl.minimum(tl.maximum(v, -8.0), 7.0)).to(tl.int8)


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, o_ptr, M, KQ, KO, stride_xm, stride_qm,
                  DIV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = tl.arange(0, BLOCK_K)
    m2 = rmask[:, None] & (cols < KQ)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)
    scale = tl.math.div_rn(absmax, 7.0).to(tl.float16)
    scale = tl.where(scale == 0, 1.0, scale).to(tl.float16)
    tl.store(s_ptr + rows, scale, mask=rmask)
    s32 = scale.to(tl.float32)
    if DIV == 0:
        q = _codes(tl.math.div_rn(x, s32[:, None]))
    else:
        inv = tl.math.div_rn(1.0, s32)
        r = x * inv[:, None]
        q = _codes(r)
        if DIV == 2:
            d = tl.abs(r - tl.floor(r) - 0.5)
            near = d <= tl.maximum(tl.abs(r), 1.0) * 1.9073486328125e-06      # 2^-19
            if tl.max(near.to(tl.int32)) > 0:                                  # rare: exact path
                q = _codes(tl.math.div_rn(x, s32[:, None]))
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=m2)
    ocols = tl.arange(0, BLOCK_O)
    om = rmask[:, None] & (ocols < KO)[None, :]
    xo = tl.load(x_ptr + rows[:, None] * stride_xm + (KQ + ocols)[None, :], mask=om, other=0.0)
    tl.store(o_ptr + rows[:, None] * KO + ocols[None, :], cast_rne(xo, o_ptr.dtype.element_ty), mask=om)


def launch(x, ko, div, bm, warps):
    m, k = x.shape
    kq = k - ko
    q = torch.empty((m, kq), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float16, device=x.device)
    o = torch.empty((m, ko), dtype=torch.float16, device=x.device)
    _quant_kernel[(triton.cdiv(m, bm),)](x, q, s, o, m, kq, ko, x.stride(0), q.stride(0), DIV=div,
                                        BLOCK_K=triton.next_power_of_2(kq),
                                        BLOCK_O=max(16, triton.next_power_of_2(ko)), BLOCK_M=bm,
                                        num_warps=warps)
    return q, s, o


rows = []
timing = Timing(warmup_ms=10, rep_ms=40)
bw = 1.0 if DRY else B.copy_bandwidth(timing)
print("copy GB/s", bw, flush=True)
shapes = [(2048, 4096), (8192, 4096), (2048, 8192)] if not DRY else [(37, 300)]
for m, k in shapes:
    ko = B.outlier_count(k)
    torch.manual_seed(0)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    x[:, k - ko:] *= 30
    nbytes = 2 * m * k + m * (k - ko) + 2 * m + 2 * m * ko
    ref = launch(x, ko, 0, 1, 8)
    for div in (0, 1, 2):
        for bm, warps in ((1, 4), (1, 8), (2, 8)):
            fn = lambda: launch(x, ko, div, bm, warps)  # noqa: E731
            t = 0.0 if DRY else cuda_time_ms([fn], timing)[0]
            got = fn()
            same = all(torch.equal(a, b) for a, b in zip(got, ref))
            pct = None if DRY else nbytes / (t * 1e-3) / 1e9 / bw
            rows.append(dict(M=m, K=k, div=div, bm=bm, warps=warps, time_ms=t, pct_bw=pct,
                             codes_equal_div_rn=same))
            print(f"M={m:5d} K={k:5d} DIV={div} bm={bm} w={warps} t={t:.4f} "
                  f"bw={'-' if pct is None else f'{pct:.0%}'} equal={same}", flush=True)
    # adversarial rows: every value an exact tie (k + 0.5) * s of its row's scale
    s = torch.tensor(0.25, dtype=torch.float16, device=DEV)
    ties = (torch.randint(-8, 7, (m, k), device=DEV).float() + 0.5) * 0.25
    ties[:, 0] = 7 * 0.25                              # absmax 7 s -> scale s exactly
    xt = ties.to(torch.bfloat16)
    same = all(torch.equal(a, b) for a, b in zip(launch(xt, ko, 2, 1, 8), launch(xt, ko, 0, 1, 8)))
    inexact = all(torch.equal(a, b) for a, b in zip(launch(xt, ko, 1, 1, 8), launch(xt, ko, 0, 1, 8)))
    rows.append(dict(M=m, K=k, adversarial_ties=True, div2_equal=same, div1_equal=inexact))
    print(f"ties M={m} K={k}: DIV=2 equal {same}, DIV=1 equal {inexact}", flush=True)
with open(os.path.join(OUT, "study_quant.json"), "w") as f:
    json.dump(dict(device="cpu (dry)" if DRY else torch.cuda.get_device_name(0),
                   torch=torch.__version__, triton=triton.__version__, copy_gbs=bw, rows=rows), f, indent=1)
