#!/usr/bin/env bash
# One-H100 speed/memory measurements (docs/performance.md), one device call per stage (each under 10 minutes):
#   bash bench/speed_suite.sh original720_extension  # original vs ours (eager, compiled), extension 720P
#   bash bench/speed_suite.sh original720_avatar     # the same for the avatar at 720P
#   bash bench/speed_suite.sh original480_extension  # the same for the extension at 480P
#   bash bench/speed_suite.sh fp8                    # linear part alone (bf16 vs FP8) + avatar FP8 weight-only error
#   bash bench/speed_suite.sh fp8_fused              # linear part alone, FP8 dynamic with fused q/k/v projections
#   bash bench/speed_suite.sh lowvram540             # whole reference pipeline at 540P, resident vs low-VRAM
#   bash bench/speed_suite.sh pipeline480_extension  # whole single-shot extension pipeline, 480P 5 s
#   bash bench/speed_suite.sh modes480_extension     # FP8 and offload modes, extension 480P (modes480_avatar: avatar)
#   bash bench/speed_suite.sh modes720_reference     # low-VRAM and FP8 dynamic at 720P (also _extension, _avatar)
#   bash bench/speed_suite.sh fused                  # compiled with and without fused q/k/v, beside the original, 480P
# The original's code is read from original/ (its skyreels_v3/ folder; git-ignored, never committed). JSON results
# go to $OUT when set (the device tool's output folder), else to bench_out/.
# SPEED_SUITE_DRY_RUN=1 prints a stage's commands instead of running them (tests/test_bench_scripts.py checks every
# stage's arguments against the scripts' parsers that way).
set -euo pipefail
stage=${1:?stage}
out=${OUT:-bench_out}
dry=${SPEED_SUITE_DRY_RUN:-}
run() { if [[ -n $dry ]]; then echo "$*"; else "$@"; fi; }
[[ -n $dry ]] || mkdir -p "$out"
if [[ -z $dry ]]; then
  source bench/device_env.sh
  install_wheels .whl_xfuser
fi
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
transformer() { run python3 bench/bench_transformer.py --warmup 1 --repeats 2 "$@"; }

case $stage in
  original720_extension)
    transformer --variants extension --resolutions 720P --modes baseline compile --original original \
      --json "$out/original720_extension.json" ;;
  original720_avatar)
    transformer --variants avatar --resolutions 720P --modes baseline compile --original original \
      --json "$out/original720_avatar.json" ;;
  original480_extension)
    transformer --variants extension --resolutions 480P --modes baseline compile --original original \
      --json "$out/original480_extension.json" ;;
  fp8)
    run python3 bench/bench_linear.py --variants reference avatar --resolutions 480P 720P --json "$out/linear.json"
    transformer --variants avatar --resolutions 480P --modes baseline fp8_weight_only \
      --json "$out/fp8_avatar480.json" ;;
  fp8_fused)
    run python3 bench/bench_linear.py --variants reference avatar --resolutions 720P 480P \
      --modes bf16 fp8_dynamic bf16_fused fp8_dynamic_fused --json "$out/linear_fused.json" ;;
  lowvram540)
    run python3 bench/bench_pipeline.py --tasks reference_to_video --resolution 540P --modes resident low_vram --steps 2 \
      --json "$out/pipeline540.json" ;;
  fused)
    transformer --variants avatar reference --resolutions 480P --modes compile compile_fused --original original \
      --json "$out/fused480.json" ;;
  pipeline480_extension)  # the one task without a whole-pipeline row: 5 s (one chunk of 7 + 33 latent frames), 8 steps
    run python3 bench/bench_pipeline.py --tasks single_shot_extension --resolution 480P --modes resident \
      --json "$out/pipeline480_extension.json" ;;
  modes480_extension)  # the mode matrix's missing cells at 480P
    transformer --variants extension --resolutions 480P --modes baseline fp8_weight_only fp8_dynamic group low_vram \
      --json "$out/modes480_extension.json" ;;
  modes480_avatar)
    transformer --variants avatar --resolutions 480P --modes baseline group low_vram --json "$out/modes480_avatar.json" ;;
  modes720_reference|modes720_extension|modes720_avatar)  # at 720P: low-VRAM and FP8 dynamic, one timed forward
    run python3 bench/bench_transformer.py --warmup 1 --repeats 1 --variants "${stage#modes720_}" --resolutions 720P \
      --modes baseline low_vram fp8_dynamic --json "$out/$stage.json" ;;  # rows are saved as they come
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
