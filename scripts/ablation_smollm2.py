"""Layer-kind sensitivity of SmolLM2-135M under W4A4 RTN (mixq.methods.ablation), on a CPU.

Each row quantizes only one linear kind (q, k, v, o, gate, up, down) to W4A4 RTN (int4 g128
weights, int4 per-token activations, no outliers, no calibration needed) and scores the first
`MAX_WINDOWS` x 2048 WikiText-2 test tokens. Writes results/ablation_smollm2_cpu.json.

    OMP_NUM_THREADS=1 python scripts/ablation_smollm2.py
"""
import json
import os
import time
from pathlib import Path

import torch

from mixq.config import QuantConfig
from mixq.eval import perplexity
from mixq.llm import load_model
from mixq.methods.ablation import layer_sensitivity

MAX_WINDOWS = int(os.environ.get("MAX_WINDOWS", "4"))
OUT = Path(__file__).resolve().parents[1] / "results" / "ablation_smollm2_cpu.json"

model, tok = load_model("smollm2", dtype=torch.float32, device="cpu")


def fresh():
    m, _ = load_model("smollm2", dtype=torch.float32, device="cpu")
    return m


t0 = time.perf_counter()
rows = layer_sensitivity(fresh, lambda m: perplexity(m, tok, max_windows=MAX_WINDOWS, progress=False),
                         config=QuantConfig(mode="w4a4"), by="kind", include_all=False)
meta = {"model": "smollm2", "config": "w4a4 RTN (int4 g128 weights, int4 per-token acts)",
        "eval": f"first {MAX_WINDOWS} x 2048 WikiText-2 test tokens", "device": "cpu",
        "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1)}
OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
for r in rows:
    print(f"{r['what']:12s} ppl {r['ppl']:10.3f}  delta {r['delta_vs_float']:+10.3f}")
