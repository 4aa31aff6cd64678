#!/usr/bin/env bash
# Issue 12 on the H100: CUDA tests of the hot path, the module benchmark, a decode profile and the
# end-to-end benchmark. Stages in the order given (default: tests gemm profile); each capped.
#   run(carry=["data", ".whl"], command="bash scripts/gpu_issue12.sh tests gemm profile")
#   run(carry=["data"], command="bash scripts/gpu_issue12.sh tune e2e")
#   stages: tests gemm decode decodeoff profile cprofile (compiled decode: CUDA graphs) tune e2e
# Writes under $OUT (default results/).
set -u
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MIXQ_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests gemm profile)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for s in "${stages[@]}"; do
  echo "=== stage $s ($(date +%T))"
  case $s in
    tests)
      par=(); python3 -c "import xdist" 2>/dev/null && par=(-n 8)
      MIXQ_NO_AUTOTUNE=1 timeout "${TESTS_TIMEOUT:-140}" python3 -m pytest -q -p no:cacheprovider "${par[@]}" \
        ${TEST_FILES:-tests/test_compile.py tests/test_nn.py tests/test_io.py tests/test_kernels_act_quant.py \
        tests/test_kernels_w4a4.py tests/test_kernels_w4a4_gemv.py tests/test_kernels_w4a4_decode.py tests/test_kernels_tuned.py \
        tests/test_norm.py tests/test_kv_cache.py tests/test_attention.py} \
        2>&1 | tee "$OUT/tests_cuda_issue12.log" | grep -E "passed|failed|error|FAILED|Error" | tail -n 30 ;;
    gemm)
      timeout "${GEMM_TIMEOUT:-170}" python3 -m mixq bench gemm --shapes 8b,1b.qkv,1b.down --m 1,16,2048 \
        --modes module --json "$OUT/gemm_module_h100.json" --md "$OUT/gemm_module_h100.md" 2>&1 | tail -n 80 ;;
    decode|decodeoff)   # decodeoff: the same with the GEMV off (the tensor-core kernel at every M)
      gm=${DECODE_GEMV_MAX_M:-16}; tag=""
      [ "$s" = decodeoff ] && gm=0 && tag=_gemv_off
      MIXQ_W4A4_GEMV_MAX_M=$gm timeout "${DECODE_TIMEOUT:-90}" python3 -m mixq bench gemm --quick --shapes 8b \
        --m "${DECODE_M:-1,4,8,16}" --modes "${DECODE_MODES:-bf16,tinygemm_w4a16,mixq_w4a16,mixq_w4a4+quant,mixq_w4a4_g128+quant,mixq_w4a4_module}" \
        --json "$OUT/gemm_decode$tag"_h100.json --md "$OUT/gemm_decode$tag"_h100.md 2>&1 | grep -E "^8b|rror" ;;
    profile)
      PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} timeout "${PROFILE_TIMEOUT:-100}" python3 scripts/profile_decode.py --layers 2 --batch 1 \
        --modes "${PROFILE_MODES:-bf16,w4a16-g128,w4a4-o1-salient,w4a4-o1-salient+kv4+attn}" \
        --json "$OUT/profile_decode_h100.json" 2>&1 | tail -n 90 ;;
    cprofile)
      PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} TORCH_LOGS=recompiles,graph_breaks,perf_hints timeout "${CPROFILE_TIMEOUT:-150}" \
        python3 scripts/profile_decode.py --compile --layers "${CPROFILE_LAYERS:-2}" --batch 1 \
        --modes "${CPROFILE_MODES:-bf16,w4a16-g128,w4a4-o1-salient}" \
        --json "$OUT/profile_decode_compiled_h100.json" 2>"$OUT/cprofile_stderr.log" | tail -n 60
      grep -i -m 10 "cudagraph\|skipping\|Recompiling\|Graph break" "$OUT/cprofile_stderr.log" | cut -c1-300 ;;
    tune)
      timeout "${TUNE_TIMEOUT:-150}" python3 -m mixq tune --quiet --m "${TUNE_M:-1,2,4,8,16,32,64,128,512,2048}" 2>&1 | tail -n 5
      cp mixq/kernels/configs/*.json "$OUT/" 2>/dev/null ;;
    e2e)
      TORCH_LOGS=recompiles,graph_breaks timeout "${E2E_TIMEOUT:-540}" python3 -m mixq bench e2e \
        --models llama3-8b --layers "${E2E_LAYERS:-8}" --modes "${E2E_MODES:-bf16,w4a16-g128,w4a4-o1-salient}" \
        --batches "${E2E_BATCHES:-1,16}" --repeats 2 --json "$OUT/e2e_h100.json" ${E2E_ARGS:-} \
        2>"$OUT/e2e_stderr.log" | tail -n 40
      grep -c "Recompiling" "$OUT/e2e_stderr.log"; grep -m 12 -A3 "Recompiling\|Graph break" "$OUT/e2e_stderr.log" | cut -c1-300 ;;
  esac
done
echo "=== done $(date +%T)"
