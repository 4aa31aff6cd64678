"""Per-layer time breakdown of one decode step (torch profiler), for the e2e closing notes.

    python scripts/profile_decode.py [--layers 2] [--batch 1] [--modes bf16,w4a4-o1-salient]
                                     [--json results/profile_decode_h100.json]

Builds the Llama-3-8B-shaped model of `mixq.experiments.bench_e2e` with `--layers` decoder
layers, quantizes it per mode (RTN presets), prefills 128 tokens, then profiles `--steps` eager
decode steps (the dynamic cache, or the preset's KV cache). Per decode step it reports:

* wall_us: CUDA-event time of one step (no profiler), i.e. what the user waits;
* kernel_us: the sum of GPU kernel times (profiler), and idle_us = wall_us - kernel_us: the time
  the GPU waits for the host (Python, checks, launches) or for syncs;
* launches per step and per decoder layer, and the top kernels (name, calls per step, us per step).

Research driver (not part of the package); CUDA only.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch


def _step_times(model, first, cache, steps: int) -> list[float]:
    out = []
    tok = first
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        logits = model(tok, past_key_values=cache, use_cache=True).logits
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3)
        tok = logits[:, -1:].argmax(-1)
    return out


def profile_mode(mode: str, layers: int, batch: int, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from mixq.api import make_cache
    from mixq.experiments import bench_e2e

    model, _ = bench_e2e.build_model("llama3-8b", layers=layers, device="cuda",
                                     dtype=torch.bfloat16)
    cfg = bench_e2e.quant_config(mode)
    if cfg is not None:
        import mixq
        mixq.quantize(model, cfg, None, progress=False)
    kv4 = cfg is not None and cfg.kv_cache is not None

    def new_cache():
        if kv4:
            return make_cache(model, check_finite=False)
        from transformers import DynamicCache
        return DynamicCache()

    ids = torch.randint(0, model.config.vocab_size, (batch, 128), device="cuda")
    with torch.no_grad():
        cache = new_cache()
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        first = logits[:, -1:].argmax(-1)
        _step_times(model, first, cache, 3)                       # warm-up, autotune
        wall = _step_times(model, first, cache, steps)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _step_times(model, first, cache, steps)
    kernels = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name[:90]]
            k[0] += 1
            k[1] += e.device_time if hasattr(e, "device_time") else e.cuda_time
    launches = sum(c for c, _ in kernels.values()) / steps
    kernel_us = sum(t for _, t in kernels.values()) / steps
    wall_us = statistics.median(wall)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:14]
    del model, cache
    torch.cuda.empty_cache()
    return {"mode": mode, "layers": layers, "batch": batch, "steps": steps,
            "wall_us": wall_us, "kernel_us": kernel_us, "idle_us": wall_us - kernel_us,
            "launches_per_step": launches, "launches_per_layer": launches / layers,
            "top_kernels": [{"name": n, "calls_per_step": c / steps, "us_per_step": t / steps}
                            for n, (c, t) in top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--modes", default="bf16,w4a16-g128,w4a4-o1-salient,w4a4-o1-salient+kv4+attn")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from mixq.experiments.common import environment
    rows = []
    for mode in a.modes.split(","):
        try:
            r = profile_mode(mode, a.layers, a.batch, a.steps)
        except Exception as e:  # noqa: BLE001 - keep the other modes
            r = {"mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(r)
        if "error" in r:
            print(mode, r["error"])
            continue
        print(f"\n== {mode}: layers={a.layers} batch={a.batch}: wall {r['wall_us']:.0f} us/step, "
              f"kernels {r['kernel_us']:.0f} us, idle {r['idle_us']:.0f} us, "
              f"{r['launches_per_step']:.0f} launches/step ({r['launches_per_layer']:.1f}/layer)")
        for k in r["top_kernels"]:
            print(f"   {k['us_per_step']:8.1f} us  {k['calls_per_step']:6.1f}x  {k['name']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": environment("cuda"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
