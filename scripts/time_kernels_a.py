"""Time kernels-a's Triton kernels on a GPU (one-shot measurement script, not a test).

* W4A16 (`mixq.kernels.w4a16`) at M in {1, 4, 16, 128, 2048} on Llama-3-8B linear shapes,
  every config of every regime list plus extra candidates, vs cuBLAS bf16 ``x @ w.T`` and
  tinygemm ``torch._weight_int4pack_mm`` (group 128).
* act_quant (`mixq.kernels.act_quant`) bandwidth vs a device-to-device copy.

Timings: triton.testing.do_bench medians (it flushes L2 before every call, so weights are
read from HBM as in decode). Writes $OUT/kernels_a_timing.json (or results/) and prints a
compact table last. Usage: ``python scripts/time_kernels_a.py`` (env TIME_BUDGET seconds).
"""
import json
import os
import platform
import sys
import time
import traceback

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mixq.kernels import _triton as KT  # noqa: E402
from mixq.kernels import w4a16 as W  # noqa: E402
from mixq.kernels import act_quant as AQ  # noqa: E402
from mixq.kernels.pack import quantize_pack_int4  # noqa: E402
from mixq.config import QuantSpec  # noqa: E402

T0 = time.time()
BUDGET = float(os.environ.get("TIME_BUDGET", "240"))
OUT = os.environ.get("OUT") or "results"
os.makedirs(OUT, exist_ok=True)
DRY = os.environ.get("MIXQ_TIME_DRY") == "1"     # CPU + TRITON_INTERPRET=1 smoke run of this script
DEV = "cpu" if DRY else "cuda"
SHAPES = [(48, 256), (32, 512)] if DRY else [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MS = [1, 16, 4, 128, 2048]          # priority order (M=1 first)
G = 128
ROWS = []


def left():
    return BUDGET - (time.time() - T0)


def bench(fn):
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3     # microseconds


C = W._cfg     # (bn, bk, split, warps, stages, magic=2, post=True, bm=None)


def cfg_name(c):
    k = c.kwargs
    s = f"n{k['BLOCK_N']}k{k['BLOCK_K']}s{k['SPLIT_K']}w{c.num_warps}st{c.num_stages}"
    if "BLOCK_M" in k:
        s = f"m{k['BLOCK_M']}" + s
    return s + ("P" if k["POST_SCALE"] else "p") + f"M{k['MAGIC']}"


EXTRA = {
    "gemv": [C(64, 128, 8, 4, 1, magic=1), C(128, 128, 8, 4, 1, magic=1), C(64, 128, 2, 4, 1),
             C(64, 128, 32, 4, 1), C(128, 128, 4, 4, 1), C(256, 128, 8, 8, 1), C(64, 128, 8, 8, 1),
             C(128, 64, 16, 4, 1), C(64, 128, 8, 4, 1, magic=0)],
    "decode": [C(64, 128, 1, 4, 3), C(64, 128, 2, 4, 3), C(128, 128, 8, 8, 3),
               C(64, 128, 4, 4, 3, magic=1), C(64, 128, 16, 4, 3), C(128, 64, 4, 4, 4)],
    "gemm": [C(256, 64, 1, 8, 4, 1, False, bm=128), C(64, 64, 1, 4, 4, 1, False, bm=64),
             C(128, 64, 1, 8, 3, 0, False, bm=128), C(128, 64, 1, 8, 3, 1, True, bm=128),
             C(128, 128, 2, 8, 3, 1, False, bm=128), C(128, 64, 4, 4, 4, 1, False, bm=64)],
}
LISTS = {"gemv": W.GEMV_CONFIGS, "decode": W.DECODE_CONFIGS, "gemm": W.GEMM_CONFIGS}


def regimes_for(m):
    """(primary regime: list + extra candidates, secondary regimes: list only)."""
    return {1: ("gemv", ["decode"]), 4: ("decode", ["gemv"]), 16: ("decode", ["gemm"]),
            128: ("gemm", ["decode"]), 2048: ("gemm", [])}[m]


def record(**row):
    ROWS.append(row)


def tinygemm_prep(n, k):
    wu8 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEV)
    wt = torch._convert_weight_to_int4pack(wu8, 8)
    sz = torch.rand(k // G, n, 2, device=DEV, dtype=torch.bfloat16) * 0.01
    return wt, sz


def check_w4a16(x, packed, scale, n, k):
    """relerr of the autotuned kernel vs dequant-then-matmul in fp32 (sanity on real shapes)."""
    from mixq import quant
    wq = quant.unpack_int4(packed, k).float()
    wd = wq * scale.float().repeat_interleave(G, dim=1)
    ref = x.float() @ wd.T
    y = W.w4a16_matmul(x, packed, scale, G).float()
    return float((y - ref).norm() / ref.norm())


def time_w4a16():
    for m in MS:
        for (n, k) in SHAPES:
            if left() < 20:
                print(f"[budget] skip w4a16 M={m} {n}x{k}", flush=True)
                continue
            torch.manual_seed(0)
            w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
            packed, scale, _ = quantize_pack_int4(w, QuantSpec(4, True, "group", group_size=G))
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            base = dict(M=m, N=n, K=k)
            t_bf16 = bench(lambda: x @ w.T)
            record(**base, impl="bf16_cublas", us=t_bf16)
            try:
                wt, sz = tinygemm_prep(n, k)
                t_tiny = bench(lambda: torch._weight_int4pack_mm(x, wt, G, sz))
                record(**base, impl="tinygemm", us=t_tiny)
            except Exception as e:  # noqa: BLE001
                t_tiny = float("nan")
                record(**base, impl="tinygemm", us=None, error=repr(e)[:200])
            try:
                W.w4a16_matmul(x, packed, scale, G)                 # autotune outside timing
                t_op = bench(lambda: W.w4a16_matmul(x, packed, scale, G))
                relerr = check_w4a16(x, packed, scale, n, k)
                best_auto = str(getattr(W._TUNED[W.w4a16_regime(m)], "best_config", None))
                if m > W.DECODE_MAX_M:
                    best_auto += " path=" + str(W._GEMM_PATH)
                record(**base, impl="mixq_op", us=t_op, relerr=relerr, config=best_auto)
            except Exception as e:  # noqa: BLE001
                t_op, relerr = float("nan"), None
                record(**base, impl="mixq_op", us=None, error=repr(e)[:300])
                traceback.print_exc()
            if m > W.DECODE_MAX_M:            # the dequantize + cuBLAS alternative of the gemm regime
                try:
                    t = bench(lambda: W._dequant_matmul(x, packed, scale, None, None, G))
                    record(**base, impl="mixq_cfg", cfg="dequant+cublas", in_list=True, us=t)
                except Exception as e:  # noqa: BLE001
                    print(f"FAIL dequant+cublas M={m} {n}x{k}: {repr(e)[:300]}", flush=True)
            primary, secondary = regimes_for(m)
            todo = [(primary, c) for c in LISTS[primary] + EXTRA[primary]]
            todo += [(r, c) for r in secondary for c in LISTS[r]]
            if m == 2048 or m == 4:   # the extra candidates matter less here: save budget
                todo = [(r, c) for r, c in todo if c in LISTS[r] or r == primary]
            for regime, cfg in todo:
                if left() < 15:
                    break
                if regime == "gemm" and m > W.GEMM_SPLIT_MAX_M and cfg.kwargs["SPLIT_K"] > 1:
                    continue
                name = f"{regime}:{cfg_name(cfg)}"
                try:
                    t = bench(lambda: W._launch(x, packed, scale, None, None, G, torch.bfloat16,
                                                config=cfg, regime=regime))
                    record(**base, impl="mixq_cfg", cfg=name, in_list=cfg in LISTS[regime], us=t)
                except Exception as e:  # noqa: BLE001
                    record(**base, impl="mixq_cfg", cfg=name, us=None, error=repr(e)[:300])
                    print(f"FAIL {name} M={m} {n}x{k}: {repr(e)[:300]}", flush=True)
            print(f"w4a16 M={m:5d} {n:5d}x{k:5d}: bf16 {t_bf16:8.1f}us tiny {t_tiny:8.1f}us "
                  f"op {t_op:8.1f}us relerr {relerr} [{left():.0f}s left]", flush=True)


def time_overhead():
    """Host-side cost per call (no L2 flush, wall clock): custom op vs raw launch vs torch."""
    if DRY:
        return
    n = k = 4096
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
    packed, scale, _ = quantize_pack_int4(w, QuantSpec(4, True, "group", group_size=G))
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    cfg = W.GEMV_CONFIGS[0]
    fns = {"bf16": lambda: x @ w.T,
           "mixq_op": lambda: W.w4a16_matmul(x, packed, scale, G),
           "mixq_raw_launch": lambda: W._launch(x, packed, scale, None, None, G, torch.bfloat16,
                                                config=cfg, regime="gemv")}
    for name, fn in fns.items():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(300):
            fn()
        torch.cuda.synchronize()
        us = (time.perf_counter() - t) / 300 * 1e6
        record(impl=f"overhead_{name}", M=1, N=n, K=k, us=us)
        print(f"host loop {name}: {us:.1f} us/call", flush=True)
    try:   # the same through CUDA graphs (what a decode loop under torch.compile would see)
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            fns["mixq_op"]()
            with torch.cuda.graph(g):
                for _ in range(20):
                    W.w4a16_matmul(x, packed, scale, G)
        torch.cuda.synchronize()
        us = do_bench(lambda: g.replay(), warmup=5, rep=25, return_mode="median") * 1e3 / 20
        record(impl="graph_mixq_op", M=1, N=n, K=k, us=us)
        print(f"cuda graph (L2-warm) mixq_op: {us:.1f} us/call", flush=True)
    except Exception as e:  # noqa: BLE001
        print("cuda graph failed:", repr(e)[:200])


def time_act_quant():
    nbytes = 1 << (20 if DRY else 30)
    a = torch.empty(nbytes // 2, device=DEV, dtype=torch.bfloat16).normal_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    copy_bw = 2 * nbytes / (t * 1e-6) / 1e9
    record(impl="copy", bytes=2 * nbytes, us=t, GBps=copy_bw)
    print(f"copy: {copy_bw:.0f} GB/s (read+write)", flush=True)
    del a, b
    cases = [(3, 256, 8, "packed"), (5, 256, 0, "int8")] if DRY else [(1, 4096, 0, "packed"), (16, 4096, 128, "packed"),
                             (2048, 4096, 128, "packed"), (8192, 4096, 0, "packed"),
                             (8192, 4096, 128, "packed"), (8192, 4096, 128, "int8"),
                             (8192, 14336, 128, "packed"), (4096, 4096, 0, "int8")]
    for m, k, k_out, fmt in cases:
        if left() < 10:
            break
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        kq = k - k_out
        AQ.act_quant(x, n_outliers=k_out, out_format=fmt)
        t = bench(lambda: AQ.act_quant(x, n_outliers=k_out, out_format=fmt))
        moved = m * k * 2 + m * ((kq + 1) // 2 if fmt == "packed" else kq) + m * 2 + m * k_out * 2
        bw = moved / (t * 1e-6) / 1e9
        best = str(AQ._act_quant_kernel.best_config)
        record(impl="act_quant", M=m, K=k, k_out=k_out, fmt=fmt, us=t, GBps=bw,
               frac_copy=bw / copy_bw, config=best)
        print(f"act_quant M={m:5d} K={k:5d} k={k_out:3d} {fmt:6s}: {t:7.1f} us {bw:6.0f} GB/s "
              f"({bw / copy_bw:.0%} of copy) {best}", flush=True)


def table():
    print("\n==== W4A16 (us, do_bench median, L2 flushed) ====")
    print(f"{'M':>5} {'N':>5} {'K':>5} | {'bf16':>7} {'tiny':>7} {'op':>7} {'best':>7} | "
          f"{'xbf16':>5} {'xtiny':>5} | best cfg")
    by = {}
    for r in ROWS:
        if "N" in r and r.get("impl", "").startswith(("bf16", "tiny", "mixq")) and r.get("us"):
            by.setdefault((r["M"], r["N"], r["K"]), []).append(r)
    for key in sorted(by):
        rs = by[key]
        get = lambda impl: next((r["us"] for r in rs if r["impl"] == impl), float("nan"))  # noqa: E731
        cfgs = [r for r in rs if r["impl"] == "mixq_cfg"]
        best = min(cfgs, key=lambda r: r["us"]) if cfgs else {"us": float("nan"), "cfg": "-"}
        mine = min(best["us"], get("mixq_op"))
        print(f"{key[0]:5d} {key[1]:5d} {key[2]:5d} | {get('bf16_cublas'):7.1f} {get('tinygemm'):7.1f} "
              f"{get('mixq_op'):7.1f} {best['us']:7.1f} | {get('bf16_cublas') / mine:5.2f} "
              f"{get('tinygemm') / mine:5.2f} | {best['cfg']}")
    print("\n==== per-config geo-mean slowdown vs best, per M (lower is better; * = in list) ====")
    import math
    for m in MS:
        agg = {}
        for key, rs in by.items():
            if key[0] != m:
                continue
            cfgs = [r for r in rs if r["impl"] == "mixq_cfg"]
            if not cfgs:
                continue
            b = min(r["us"] for r in cfgs)
            for r in cfgs:
                agg.setdefault((r["cfg"], r.get("in_list")), []).append(math.log(r["us"] / b))
        ranked = sorted(((math.exp(sum(v) / len(v)), c, il, len(v)) for (c, il), v in agg.items()))
        print(f"M={m}: " + "  ".join(f"{c}{'*' if il else ''}={s:.2f}" for s, c, il, _ in ranked[:8]))


def main():
    info = dict(gpu="cpu-dry" if DRY else torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(),
                autotune_cache_results="cache_results" in KT._autotune_params())
    print(info, flush=True)
    record(impl="info", **info)
    for step in (time_act_quant, time_overhead, time_w4a16):
        if left() < 10:
            print(f"[budget] skip {step.__name__}")
            continue
        try:
            step()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        with open(os.path.join(OUT, "kernels_a_timing.json"), "w") as f:
            json.dump(ROWS, f, indent=1, default=str)
    table()
    print(f"total {time.time() - T0:.0f}s")


if __name__ == "__main__":
    main()
