#!/usr/bin/env bash
# Whole-run rows on N GPUs with their one-GPU baseline in the same call (one device call per row, each under 10
# minutes on H100s): bench/bench_e2e.py on 1 GPU (VAE tiled like the parallel VAE), then under torchrun on N GPUs
# (Ulysses over all of them), the same preset, seed and random weights; the N-GPU row carries the max / mean
# difference of its frames from the one-GPU frames (uint8 levels).
#   bash bench/e2e_suite.sh CASE PRESET [GPUS]
#     CASE:   reference_720p (5 s, 2 of 8 steps measured, 8 projected), extension_720p (5 s, likewise),
#             avatar_480p (keyframe clip + 2 windows of 4 steps; 200 s of audio projected from the windows)
#     PRESET: default (bf16 eager), compile, fast (8-bit attention + FP8 dynamic + compile), shard (default +
#             --shard-weights on the N GPUs)
#     GPUS:   default 4
# JSON goes to $OUT (else bench_out/): e2e_<case>_<preset>_1gpu.json and e2e_<case>_<preset>_<N>gpu.json. Frames
# stay in /tmp/e2e_frames (too large to bring back). Wheels not on the machine (diffusers, torchao) are installed
# from .whl/ when present. E2E_SUITE_DRY_RUN=1 prints the commands instead of running them (tests check them).
set -euo pipefail
case_=${1:?case: reference_720p, extension_720p or avatar_480p}
preset=${2:?preset: default, compile, fast or shard}
gpus=${3:-4}
out=${OUT:-bench_out}
dry=${E2E_SUITE_DRY_RUN:-}
run() { if [[ -n $dry ]]; then echo "$*"; else "$@"; fi; }
case $case_ in
  reference_720p|extension_720p) extra=(--steps 2) ;;
  avatar_480p) extra=(--avatar-seconds 4) ;;
  *) echo "unknown case $case_" >&2; exit 2 ;;
esac
case $preset in
  default|compile|fast) bench_preset=$preset; shard=() ;;
  shard) bench_preset=default; shard=(--shard-weights) ;;
  *) echo "unknown preset $preset" >&2; exit 2 ;;
esac
frames=/tmp/e2e_frames/$case_
if [[ -z $dry ]]; then
  mkdir -p "$out" "$frames"
  source bench/device_env.sh
  install_wheels
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
fi
common=(--cases "$case_" --presets "$bench_preset" "${extra[@]}" --save-frames "$frames")
run python3 bench/bench_e2e.py "${common[@]}" --vae-tiling --json "$out/e2e_${case_}_${preset}_1gpu.json"
run python3 -m torch.distributed.run --nproc_per_node "$gpus" bench/bench_e2e.py "${common[@]}" "${shard[@]}" \
  --json "$out/e2e_${case_}_${preset}_${gpus}gpu.json"
