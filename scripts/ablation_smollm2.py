"""Layer-kind sensitivity of SmolLM2-135M under W4A4 RTN, on a CPU: ``python -m mixq ablation``
with the settings of results/ablation_smollm2_cpu.json.

Each row quantizes only one linear kind (q, k, v, o, gate, up, down) with the preset
"w4a4-rtn" (int4 g128 weights, int4 per-token activations, no outliers, no calibration needed)
and scores the first `MAX_WINDOWS` x 2048 WikiText-2 test tokens.

    OMP_NUM_THREADS=1 python scripts/ablation_smollm2.py
"""
import os
import sys
from pathlib import Path

from mixq.experiments import ablation

OUT = Path(__file__).resolve().parents[1] / "results" / "ablation_smollm2_cpu.json"

sys.exit(ablation.main(["--model", "smollm2", "--preset", "w4a4-rtn", "--by", "kind", "--no-all",
                        "--max-windows", os.environ.get("MAX_WINDOWS", "4"), "--device", "cpu",
                        "--dtype", "fp32", "--json", str(OUT)]))
