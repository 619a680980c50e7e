#!/usr/bin/env bash
# `--fast` against compiled bf16 at 720P on one H200, one part per device call (each under the 600-s call limit):
#   bash bench/fast_step_suite.sh reference      # kernel A/B (P scale in the exponent vs a multiply) + reference
#   bash bench/fast_step_suite.sh reference_fast # reference: fast and compile (the FP8 compile alone takes ~150 s)
#   bash bench/fast_step_suite.sh avatar
#   bash bench/fast_step_suite.sh avatar_fast    # (not run on 2026-11-29: the device time was spent)
#   bash bench/fast_step_suite.sh extension
# carry: .whl (diffusers/torchao wheels) and original/ (the original repository's skyreels_v3/, git-ignored).
# Transformer rows build 10 of the 40 blocks (`--layers 10`): a step is 40 identical blocks plus a small head, so the
# ratios between modes carry over to the whole model (the head's share grows a little: the ratios are if anything
# understated) while the device time fits. Compiling the FP8-dynamic linears takes 130-280 s per process (measured
# 2026-11-29, one dynamo graph per mode: no recompiles), so a part holds at most two FP8 modes.
# JSON results go to $OUT when set (the device tool's output folder), else to bench_out/.
set -uo pipefail
part=${1:?reference, reference_fast, avatar, avatar_fast or extension}
out=${OUT:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
step() {  # variant, seconds, json name, modes and options...
  local variant=$1 limit=$2 name=$3
  shift 3
  timeout "$limit" python3 bench/bench_transformer.py --variants "$variant" --resolutions 720P --modes "$@" \
    --layers 10 --warmup 1 --json "$out/$name.json" 2>&1 | grep -v '^{\|Warn\|Attention backends'
}
case $part in
  reference)
    timeout 120 python3 bench/bench_attention.py --tokens 75600 126000 --heads 40 \
      --modes int8_fp8 int8_fp8_mulp int8_bf16 --repeats 3 --error-queries 1024 \
      --json "$out/attention_8bit_fold.json" 2>&1 | grep -v '^{\|Warn'
    step reference 440 fast_step_reference720 original baseline compile fp8_dynamic attn8 fast --repeats 2 \
      --original original
    ;;
  reference_fast) step reference 225 fast_step_reference720_b fast compile --repeats 1 ;;
  avatar) step avatar 560 fast_step_avatar720 original baseline compile fp8_dynamic attn8 fast --repeats 2 \
    --original original ;;
  avatar_fast) step avatar 500 fast_step_avatar720_b fast compile --repeats 1 ;;
  extension) step extension 500 fast_step_extension720 baseline compile fp8_dynamic fast --repeats 2 ;;
  *) echo "unknown part $part" >&2 && exit 2 ;;
esac
