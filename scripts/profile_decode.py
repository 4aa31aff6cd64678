"""Per-layer time breakdown of one decode step (torch profiler), for the e2e closing notes.

    python scripts/profile_decode.py [--layers 2] [--batch 1] [--modes bf16,w4a4-o1-salient]
                                     [--json results/profile_decode_h100.json]

Builds the Llama-3-8B-shaped model of `mixq.experiments.bench_e2e` with `--layers` decoder
layers, quantizes it per mode (RTN presets), prefills 128 tokens, then profiles `--steps` eager
decode steps (the dynamic cache, or the preset's KV cache). With ``--compile`` the decode step
is what HF's generate runs when it compiles: a static cache and
``torch.compile(mode="reduce-overhead")`` (CUDA graphs), with fresh compile caches per mode
(KV4 modes keep their own cache and stay eager). Per decode step it reports:

* wall_us: CUDA-event time of one step (no profiler), i.e. what the user waits;
* kernel_us: the sum of GPU kernel times (profiler), and idle_us = wall_us - kernel_us: the time
  the GPU waits for the host (Python, checks, launches) or for syncs;
* launches per step and per decoder layer, and the top kernels (name, calls per step, us per step);
* graph_launches: cudaGraphLaunch calls per step (compiled: 1 when the whole step replays as
  one CUDA graph; 0 means the step ran without CUDA graphs) and compiled_graphs (dynamo).

Research driver (not part of the package); CUDA only.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch


def _step_times(model, first, cache, steps: int, pos: int = 0, compiled=None) -> list[float]:
    """CUDA-event time of `steps` decode steps (us). `compiled`: the compiled forward, fed
    explicit cache positions from `pos` (the static cache), else `model` itself."""
    out = []
    tok = first
    for i in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        if compiled is None:
            logits = model(tok, past_key_values=cache, use_cache=True).logits
        else:
            torch.compiler.cudagraph_mark_step_begin()
            p = torch.full((1,), pos + i, dtype=torch.long, device=tok.device)
            logits = compiled(input_ids=tok, past_key_values=cache, use_cache=True,
                              cache_position=p, position_ids=p.expand(tok.shape[0], 1)).logits
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3)
        tok = logits[:, -1:].argmax(-1)
    return out


def profile_mode(mode: str, layers: int, batch: int, steps: int, compile: bool = False) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from mixq.api import make_cache
    from mixq.experiments import bench_e2e

    if compile:
        bench_e2e._fresh_compile_caches()
    model, _ = bench_e2e.build_model("llama3-8b", layers=layers, device="cuda",
                                     dtype=torch.bfloat16)
    cfg = bench_e2e.quant_config(mode)
    if cfg is not None:
        import mixq
        mixq.quantize(model, cfg, None, progress=False)
    kv4 = cfg is not None and cfg.kv_cache is not None
    compile = compile and not kv4
    prompt = 128

    def new_cache():
        if kv4:
            return make_cache(model, check_finite=False)
        if compile:
            from transformers import StaticCache
            return StaticCache(config=model.config, max_cache_len=prompt + 4 * steps + 8)
        from transformers import DynamicCache
        return DynamicCache()

    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    compiled = torch.compile(model, mode="reduce-overhead") if compile else None
    with torch.no_grad():
        cache = new_cache()
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        first = logits[:, -1:].argmax(-1)
        pos = prompt
        _step_times(model, first, cache, 3, pos, compiled)        # warm-up, autotune, capture
        pos += 3
        wall = _step_times(model, first, cache, steps, pos, compiled)
        pos += steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _step_times(model, first, cache, steps, pos, compiled)
    kernels = defaultdict(lambda: [0, 0.0])
    graph_launches = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name[:90]]
            k[0] += 1
            k[1] += e.device_time if hasattr(e, "device_time") else e.cuda_time
        elif e.name.startswith("cudaGraphLaunch"):
            graph_launches += 1
    launches = sum(c for c, _ in kernels.values()) / steps
    kernel_us = sum(t for _, t in kernels.values()) / steps
    wall_us = statistics.median(wall)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:14]
    del model, cache, compiled
    torch.cuda.empty_cache()
    row = {"mode": mode, "layers": layers, "batch": batch, "steps": steps, "compile": compile,
           "wall_us": wall_us, "kernel_us": kernel_us, "idle_us": wall_us - kernel_us,
           "launches_per_step": launches, "launches_per_layer": launches / layers,
           "graph_launches_per_step": graph_launches / steps,
           "top_kernels": [{"name": n, "calls_per_step": c / steps, "us_per_step": t / steps}
                           for n, (c, t) in top]}
    if compile:
        row["compiled_graphs"] = bench_e2e._compiled_graphs()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--modes", default="bf16,w4a16-g128,w4a4-o1-salient,w4a4-o1-salient+kv4+attn")
    p.add_argument("--compile", action="store_true",
                   help="static cache + torch.compile reduce-overhead (CUDA graphs)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from mixq.experiments.common import environment
    rows = []
    for mode in a.modes.split(","):
        try:
            r = profile_mode(mode, a.layers, a.batch, a.steps, a.compile)
        except Exception as e:  # noqa: BLE001 - keep the other modes
            r = {"mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(r)
        if "error" in r:
            print(mode, r["error"])
            continue
        print(f"\n== {mode}: layers={a.layers} batch={a.batch} compile={r['compile']}: "
              f"wall {r['wall_us']:.0f} us/step, kernels {r['kernel_us']:.0f} us, "
              f"idle {r['idle_us']:.0f} us, {r['launches_per_step']:.0f} launches/step "
              f"({r['launches_per_layer']:.1f}/layer), "
              f"{r['graph_launches_per_step']:.1f} graph launches/step, "
              f"{r.get('compiled_graphs', '-')} graphs compiled")
        for k in r["top_kernels"]:
            print(f"   {k['us_per_step']:8.1f} us  {k['calls_per_step']:6.1f}x  {k['name']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": environment("cuda"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
