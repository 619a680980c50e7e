#!/usr/bin/env bash
# FlashAttention-3 and the 8-bit path on one Hopper GPU, one part per device call (each under the 600-s limit), in
# the order of their value (the 75,600-token kernel table, measured 2026-12-07, is the last part):
#   bash bench/fa3_suite.sh reference   # (~8 min) reference 720P step: --compile (cuDNN) vs --compile with fa3 vs
#                                       # --fast (FAST below); then fa3_fp8 at 75,600 tokens eager and compiled
#                                       # (its input preparation fused by Inductor, as inside --fast)
#   bash bench/fa3_suite.sh avatar      # (~7 min) avatar 720P step: the same three modes
#   bash bench/fa3_suite.sh extension   # (~8 min) extension 720P step: the same three modes
#   bash bench/fa3_suite.sh extra       # (~9 min) kernel table at 32,760 and 126,000 tokens; our tile configs with
#                                       # their errors; the goldens' bf16 parity on fa3 (needs pytest: carry its wheels)
#   bash bench/fa3_suite.sh kernels     # (~2.5 min) the kernel table at 75,600 tokens x 40 heads: three input
#                                       # suites x cuDNN, FA3 bf16, FA3 FP8 plain / scaled / scaled+rotated, ours
#                                       # (with and without the V compensation, rotated, bf16 P·V)
# FAST (default fast_fa3fp8) picks the --fast variant of the step parts: fast_fa3fp8 (FA3 FP8 + FP8 linears +
# compile), fast_triton (our Triton kernel, the preset measured before) or fast (as optimization.fast_preset resolves).
# Steps build 10 of the 40 blocks (`--layers 10`; the ratios between modes are those of the whole step) and time one
# forward after one warm-up; compiling the FP8-dynamic linears takes 130-280 s per process, hence one FP8 mode a part.
# carry: .whl/ with the diffusers, torchao and fa3-fwd wheels (installed to .site/ by bench/device_env.sh). JSON
# results go to $OUT when set (the device tool's output folder), else to bench_out/. FA3_SUITE_DRY_RUN=1 prints the
# commands instead (tests/test_bench_scripts.py checks every part's arguments against the scripts' parsers that way).
set -uo pipefail
part=${1:?reference, avatar, extension, extra or kernels}
out=${OUT:-bench_out}
fast=${FAST:-fast_fa3fp8}
dry=${FA3_SUITE_DRY_RUN:-}
run() { if [[ -n $dry ]]; then echo "$*"; else "$@" 2>&1 | grep -v '^{\|Warn\|Attention backends'; fi; }
[[ -n $dry ]] || mkdir -p "$out"
if [[ -z $dry ]]; then
  source bench/device_env.sh
  install_wheels
fi
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
kernels() {  # seconds, json name, bench_attention arguments...
  local limit=$1 name=$2
  shift 2
  run timeout "$limit" python3 bench/bench_attention.py --heads 40 --repeats 3 --error-queries 1024 \
    --json "$out/$name.json" "$@"
}
step() {  # variant, seconds: --compile (cuDNN), --compile with fa3, the --fast variant
  run timeout "$2" python3 bench/bench_transformer.py --variants "$1" --resolutions 720P \
    --modes compile compile_fa3 "$fast" --layers 10 --warmup 1 --repeats 1 --json "$out/step_${1}720.json"
}
case $part in
  reference)
    step reference 400
    kernels 120 kernels_compiled --tokens 75600 --suites gaussian trained --modes fa3 fa3_fp8 fa3_fp8_compiled ;;
  avatar) step avatar 540 ;;
  extension) step extension 550 ;;
  extra)
    kernels 290 kernels_more --tokens 32760 126000 --modes fa3 fa3_fp8 int8_fp8 int8_fp8_rot int8_bf16_rot
    kernels 160 kernels_configs --tokens 75600 --suites gaussian trained --modes int8_fp8 int8_bf16 --configs
    if [[ -n $dry ]]; then
      :
    elif python3 -c "import pytest" 2>/dev/null; then
      timeout 100 python3 -m pytest -q -p no:cacheprovider tests/models/test_attention_fa3.py -k gpu 2>&1 | tail -15
    else
      echo "pytest is not installed: the goldens' parity on fa3 (tests/models/test_attention_fa3.py -k gpu) skipped"
    fi ;;
  kernels)
    kernels 150 kernels75600 --tokens 75600 --modes fa3 fa3_fp8_naive fa3_fp8_scaled fa3_fp8 int8_fp8 \
      int8_fp8_nocomp int8_fp8_rot int8_bf16 int8_bf16_rot ;;
  *) echo "unknown part $part" >&2 && exit 2 ;;
esac
