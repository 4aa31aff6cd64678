"""GPTQ with the attention-sink token weighted (``GPTQ(sink_weight=...)``) on SmolLM2-135M, CPU.

    OMP_NUM_THREADS=1 python scripts/gptq_sink_smollm2.py MODE SINK [--json PATH]

MODE: ``w4a16`` (int4 g128 weights + GPTQ) or ``w4a4`` (the ``w4a4-o1+rotation+gptq`` preset with
its GPTQ's sink weight replaced); SINK: a number (1 = plain GPTQ) or ``seqlen``. Protocol of
the issues: 16 x 2048 calibration tokens of WikiText-2 valid, perplexity on the first 8 windows
of 2048 test tokens. The row is merged into the JSON (default
``results/gptq_sink_smollm2_cpu.json``, keyed by mode and sink weight). Research driver.
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import mixq
import mixq.calibrate
from mixq.config import QuantConfig, QuantSpec
from mixq.experiments.common import environment, now, write_results
from mixq.methods import GPTQ


def config(mode: str, sink) -> QuantConfig:
    if mode == "w4a16":
        return QuantConfig(mode="w4a16", w=QuantSpec(4, True, "group", 128),
                           methods=(GPTQ(sink_weight=sink),))
    cfg = mixq.preset("w4a4-o1+rotation+gptq")
    return dataclasses.replace(cfg, methods=tuple(
        dataclasses.replace(m, sink_weight=sink) if isinstance(m, GPTQ) else m
        for m in cfg.methods))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("w4a16", "w4a4"))
    p.add_argument("sink")
    p.add_argument("--json", default="results/gptq_sink_smollm2_cpu.json")
    a = p.parse_args()
    sink = a.sink if a.sink == "seqlen" else float(a.sink)
    torch.set_num_threads(1)
    model, tok = mixq.load_model("smollm2")
    calib = mixq.calibrate.calibration_batches(tok, n_samples=16, seqlen=2048)
    t = time.time()
    mixq.quantize(model, config(a.mode, sink), calib, progress=False)
    quant_s = time.time() - t
    ppl = mixq.perplexity(model, tok, max_windows=8, progress=False)["ppl"]
    row = {"mode": a.mode, "sink_weight": sink, "ppl": ppl, "quant_s": round(quant_s, 1),
           "total_s": round(time.time() - t, 1), "n_calib": 16, "calib_seqlen": 2048,
           "max_windows": 8}
    print(json.dumps(row))
    path = Path(a.json)
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if (r["mode"], r["sink_weight"]) != (a.mode, sink)] + [row]
    write_results(path, rows, {**environment("cpu"), "model": "smollm2", "finished": now(),
                               "command": "python scripts/gptq_sink_smollm2.py MODE SINK"})


if __name__ == "__main__":
    main()
