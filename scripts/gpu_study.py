"""Kernel design study on the H100 (one call): which changes move the issue-4 targets.

    python scripts/gpu_study.py OUT_DIR [sections...]     sections: w4a4 out w4a16 decode quant

Run 2 also timed an even/odd-halves W4A16 decode kernel that was then dropped (2x slower than
the current decode kernels; scripts/KERNEL_NOTES.md, results/study/study_run2_h100.json).

Each section times candidate variants side by side with the peers in the bench's harness
(`mixq.experiments.common.cuda_time_ms`: CUDA graph replays under do_bench, median) and writes
one JSON row per variant to OUT_DIR/study.json (rewritten after every row, so a timeout keeps what ran).
Findings and predictions live in scripts/KERNEL_NOTES.md.
"""
import json
import os
import sys
import time

import torch
import triton

from mixq.experiments import bench_gemm as B
from mixq.experiments.common import Timing, cuda_time_ms
from mixq.kernels import act_quant as AQ
from mixq.kernels import w4a4 as W
from mixq.kernels import w4a16 as W16

OUT = sys.argv[1]
SECTIONS = sys.argv[2:] or ["w4a4", "out", "w4a16", "decode", "quant"]
DRY = os.environ.get("STUDY_DRY") == "1"     # CPU dry run under TRITON_INTERPRET=1 (tiny shapes)
DEV = "cpu" if DRY else "cuda"
T0 = time.time()
ROWS = []
TIMING = Timing(warmup_ms=10, rep_ms=40)
SHAPES = {"8b.gate_up": (28672, 4096), "8b.down": (4096, 14336), "8b.o": (4096, 4096)}
if DRY:
    SHAPES = {"tiny.a": (128, 256), "tiny.b": (64, 1664)}
DEVICE_NAME = "cpu (dry run)" if DRY else torch.cuda.get_device_name(0)


def record(section, shape, m, variant, t, **extra):
    ROWS.append(dict(section=section, shape=shape, M=m, variant=variant, time_ms=t, **extra))
    print(f"[{time.time() - T0:5.0f}s] {section:6s} {shape:11s} M={m:5d} {variant:48s} "
          f"{'-' if t is None else f'{t:.4f}'} {extra if extra else ''}", flush=True)
    with open(os.path.join(OUT, "study.json"), "w") as f:
        json.dump(dict(device=DEVICE_NAME, torch=torch.__version__,
                       triton=triton.__version__, rows=ROWS), f, indent=1)


def timed(fn):
    try:
        if DRY:
            fn()
            return 0.0, None
        return cuda_time_ms([fn], TIMING)[0], None
    except Exception as e:  # noqa: BLE001 - a variant that fails to compile is a finding
        return None, repr(e)[:300]


def peers(section, shape, n, k, m):
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
    t, _ = timed(lambda: x @ w.T)
    record(section, shape, m, "peer bf16", t)
    xf, wf = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    sa = torch.ones(m, 1, device=DEV)
    sb = torch.ones(1, n, device=DEV)
    t, _ = timed(lambda: torch._scaled_mm(xf, wf.T, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
    record(section, shape, m, "peer fp8", t)
    return x, w


def cfg4(bm, bn, warps, stages):
    return W._cfg(bm, bn, warps, stages)


# ---------------------------------------------------------------------------- W4A4 main loop
def study_w4a4():
    cands = [cfg4(128, 128, 4, 4), cfg4(128, 128, 4, 3), cfg4(128, 128, 4, 5),
             cfg4(256, 64, 4, 4), cfg4(256, 64, 4, 3), cfg4(128, 64, 4, 4), cfg4(64, 128, 4, 4),
             cfg4(128, 256, 8, 3), cfg4(256, 128, 8, 4), cfg4(128, 128, 8, 4)]
    for shape, (n, k) in SHAPES.items():
        wq = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
        wp = W.prepare_w4a4_weight(wq)
        ws = (torch.rand(n, 1, device=DEV) * 0.01 + 1e-3).half()
        for m in ((20, 9) if DRY else (2048, 512)):
            peers("w4a4", shape, n, k, m)
            xq = torch.randint(-8, 8, (m, k), dtype=torch.int8, device=DEV)
            xs = (torch.rand(m, 1, device=DEV) * 0.01 + 1e-3).half()
            ref = None
            for c in cands:
                if m == 512 and c.kwargs["BM"] == 256:
                    continue
                fn = lambda c=c: W._launch(xq, xs, wp, ws, 0, 128, None, None, None,  # noqa: E731
                                           torch.bfloat16, False, config=c)
                t, err = timed(fn)
                ok = None
                if t is not None:
                    acc = W._launch(xq, None, wp, None, 0, 128, None, None, None, torch.int32,
                                    True, config=c)
                    if ref is None:
                        ref = (xq.double() @ wq.double().T).to(torch.int32)
                    ok = bool(torch.equal(acc, ref))
                name = f"BM{c.kwargs['BM']} BN{c.kwargs['BN']} w{c.num_warps} s{c.num_stages}"
                record("w4a4", shape, m, name, t, exact=ok, error=err)


# ---------------------------------------------------------------------------- fused outliers
def study_outliers():
    for shape, (n, k) in SHAPES.items():
        ko = B.outlier_count(k)
        kq = k - ko
        kpad = W.padded_in_features(kq)
        wq = torch.randint(-8, 8, (n, kq), dtype=torch.int8, device=DEV)
        wp = W.prepare_w4a4_weight(wq)
        ws = (torch.rand(n, 1, device=DEV) * 0.01 + 1e-3).half()
        wo = (torch.randn(n, ko, device=DEV) * 0.02).half()
        for m in ((20, 9) if DRY else (2048, 512)):
            xq = torch.randint(-8, 8, (m, kq), dtype=torch.int8, device=DEV)
            xq_pad = torch.nn.functional.pad(xq, (0, kpad - kq))
            xs = (torch.rand(m, 1, device=DEV) * 0.01 + 1e-3).half()
            xo = (torch.randn(m, ko, device=DEV) * 30).half()
            xb = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            for c in (cfg4(128, 128, 4, 4), cfg4(256, 64, 4, 4) if m == 2048 else cfg4(64, 128, 4, 4)):
                tag = f"BM{c.kwargs['BM']} BN{c.kwargs['BN']}"
                run = lambda x, o, c=c: W._launch(x, xs, wp, ws, 0, 128, o, wo if o is not None else None,  # noqa: E731
                                                  None, torch.bfloat16, False, config=c)
                record("out", shape, m, f"{tag} plain Kpad (no outliers)", timed(lambda: run(xq_pad, None))[0])
                record("out", shape, m, f"{tag} k={ko} x_q Kq cols (pad copy)", timed(lambda: run(xq, xo))[0])
                record("out", shape, m, f"{tag} k={ko} x_q pre-padded", timed(lambda: run(xq_pad, xo))[0])
                y0 = run(xq, xo)
                y1 = run(xq_pad, xo)
                same = bool(torch.equal(y0, y1))
                old = W._MAX_SINGLE_OUT
                W._MAX_SINGLE_OUT = 256
                try:
                    record("out", shape, m, f"{tag} k={ko} pre-padded, one step <=256",
                           timed(lambda: run(xq_pad, xo))[0], same_as_padcopy=same)
                finally:
                    W._MAX_SINGLE_OUT = old
            # the act-quant kernel writing int8 codes (bench mode mixq_quant)
            record("out", shape, m, "act_quant int8 + outliers (current)",
                   timed(lambda: AQ.act_quant(xb, n_outliers=ko, out_format="int8"))[0])


# ---------------------------------------------------------------------------- W4A16 large M
def study_w4a16():
    def c16(bn, bk, warps, stages, bm, magic=1, post=False):
        return W16._cfg(bn, bk, 1, warps, stages, magic=magic, post=post, bm=bm)
    mode1 = [c16(128, 64, 4, 4, 128), c16(128, 64, 4, 3, 128), c16(128, 128, 4, 3, 128),
             c16(64, 64, 4, 4, 256), c16(128, 64, 8, 3, 256), c16(128, 64, 4, 4, 64),
             c16(256, 64, 8, 3, 128), c16(128, 64, 4, 4, 128, magic=0)]
    for shape, (n, k) in SHAPES.items():
        from mixq.quant import pack_int4
        wq = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
        wp = pack_int4(wq)
        s = (torch.rand(n, k // 128, device=DEV) * 0.01 + 1e-3).half()
        for m in ((20,) if DRY else (128, 512, 2048)):
            x, _ = peers("w4a16", shape, n, k, m)
            ref = W16._dequant_matmul(x, wp, s, None, None, 128)
            for path in ("fused", "dequant"):
                W16.GEMM_PATH_OVERRIDE = path
                try:
                    t, err = timed(lambda: W16.w4a16_matmul(x, wp, s, 128))
                finally:
                    W16.GEMM_PATH_OVERRIDE = None
                record("w4a16", shape, m, f"current {path}", t, error=err)
            record("w4a16", shape, m, "dequantize_int4 alone",
                   timed(lambda: W16.dequantize_int4(wp, s, 128, k, torch.bfloat16))[0])
            for c in mode1:
                fn = lambda c=c: W16._launch(x, wp, s, None, None, 128, torch.bfloat16,  # noqa: E731
                                             config=c, regime="decode")
                t, err = timed(fn)
                rel = None
                if t is not None:
                    rel = float((fn().float() - ref.float()).norm() / ref.float().norm())
                kw = c.kwargs
                record("w4a16", shape, m, f"mode1 BN{kw['BLOCK_N']} BM{kw['BLOCK_M']} BK{kw['BLOCK_K']} "
                       f"w{c.num_warps} s{c.num_stages} magic{kw['MAGIC']}", t, rel_vs_dequant=rel, error=err)


# ---------------------------------------------------------------------------- W4A16 decode
def study_decode():
    from mixq.quant import pack_int4
    gemv = [W16._cfg(*a, magic=mg) for *a, mg in
            [(64, 128, 8, 4, 1, 0), (64, 256, 8, 4, 1, 0), (32, 256, 8, 4, 1, 0), (64, 128, 16, 4, 1, 0),
             (128, 256, 4, 8, 1, 0), (32, 128, 16, 2, 1, 0), (64, 256, 4, 4, 1, 0), (128, 128, 8, 4, 1, 0),
             (64, 128, 8, 4, 1, 2), (256, 128, 4, 8, 1, 0)]]
    dec = [W16._cfg(*a, magic=1) for a in
           [(64, 128, 4, 4, 3), (64, 128, 8, 4, 3), (64, 256, 4, 4, 3), (128, 128, 8, 4, 3),
            (64, 128, 8, 4, 4), (64, 256, 8, 4, 2), (128, 256, 4, 8, 3), (64, 128, 16, 4, 3)]]
    shapes = SHAPES if DRY else dict(SHAPES, **{"8b.qkv": (6144, 4096)})
    for shape, (n, k) in shapes.items():
        wq = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
        wp = pack_int4(wq)
        s = (torch.rand(n, k // 128, device=DEV) * 0.01 + 1e-3).half()
        try:
            wt = B.tinygemm_weight((wq.float() * 0.01).to(torch.bfloat16))
        except Exception:  # noqa: BLE001 - CUDA-only op (dry run)
            wt = None
        for m, cands, regime in ((1, gemv, "gemv"), (16, dec, "decode")):
            x, _ = peers("decode", shape, n, k, m)
            if wt is not None:
                try:
                    wpk, sz = wt
                    record("decode", shape, m, "peer tinygemm",
                           timed(lambda: torch._weight_int4pack_mm(x, wpk, 128, sz))[0])
                except Exception as e:  # noqa: BLE001
                    record("decode", shape, m, "peer tinygemm", None, error=repr(e)[:200])
            record("decode", shape, m, "current autotuned", timed(lambda: W16.w4a16_matmul(x, wp, s, 128))[0])
            for c in cands:
                kw = c.kwargs
                t, err = timed(lambda c=c: W16._launch(x, wp, s, None, None, 128, torch.bfloat16,
                                                       config=c, regime=regime))
                record("decode", shape, m, f"{regime} BN{kw['BLOCK_N']} BK{kw['BLOCK_K']} sk{kw['SPLIT_K']} "
                       f"w{c.num_warps} s{c.num_stages} magic{kw['MAGIC']}", t, error=err)


# ---------------------------------------------------------------------------- act-quant bandwidth
def study_quant():
    bw = 1.0 if DRY else B.copy_bandwidth(TIMING)
    record("quant", "-", 0, "copy bandwidth GB/s", None, gbps=bw)
    import triton as _t
    cands = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 2), (2, 4)]   # run 1 swept (1..16) x (4, 8, 16)
    for shape, (n, k) in SHAPES.items():
        ko = B.outlier_count(k)
        for m in ((5,) if DRY else (2048, 8192)):
            if shape == "8b.o":
                continue                      # same K as gate_up
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            nbytes = 2 * m * k + (m * (k - ko)) + 2 * m + 2 * m * ko
            t, _ = timed(lambda: AQ.act_quant(x, n_outliers=ko, out_format="int8"))
            record("quant", shape, m, "current autotuned", t, pct_bw=None if not t else nbytes / (t * 1e-3) / 1e9 / bw)
            kq = k - ko
            single = kq <= AQ._SINGLE_PASS_MAX
            block_k = max(AQ._next_pow2(kq), 16) if single else AQ._LOOP_BLOCK_K
            xq = torch.empty((m, kq), dtype=torch.int8, device=DEV)
            xs = torch.empty((m, 1), dtype=torch.float16, device=DEV)
            xo = torch.empty((m, ko), dtype=torch.float16, device=DEV)
            for bm, warps in cands:
                if bm * block_k > 65536:
                    continue
                fn = lambda bm=bm, warps=warps: AQ._act_quant_kernel.fn[(_t.cdiv(m, bm),)](  # noqa: E731
                    x, xs, xq, xs, xo, m, kq, kq, ko, 0, x.stride(0), xq.stride(0), ko,
                    HAS_PERM=False, PACKED=False, QMIN=-8, QMAX=7, SINGLE_PASS=single,
                    BLOCK_K=block_k, BLOCK_O=min(max(AQ._next_pow2(ko), 16), 1024), BLOCK_M=bm,
                    num_warps=warps)
                t, err = timed(fn)
                record("quant", shape, m, f"BLOCK_M{bm} w{warps}", t, error=err,
                       pct_bw=None if not t else nbytes / (t * 1e-3) / 1e9 / bw)


print(DEVICE_NAME, torch.__version__, triton.__version__, SECTIONS, flush=True)
for sec in SECTIONS:
    try:
        {"w4a4": study_w4a4, "out": study_outliers, "w4a16": study_w4a16, "decode": study_decode,
         "quant": study_quant}[sec]()
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        record(sec, "-", 0, "SECTION FAILED", None, error=repr(e)[:500])
print(f"study done in {time.time() - T0:.0f}s", flush=True)
