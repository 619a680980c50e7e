#!/usr/bin/env bash
# Whole talking-avatar runs on one GPU, one row per device call (each under the 600-s limit), in the order of their
# value: bench/avatar_run.py with random weights at real size, written as the CLI writes it.
#   bash bench/avatar_suite.sh ROW
#     fast | compile | default   a whole 30-s 480P run (the keyframe clip + 12 windows) with that preset
#     720p_fast | 720p_compile | 720p_default
#                                a 720P keyframe clip + 2 windows (5.8 s of audio)
#     vae                        one window's VAE work (encode 81 frames, decode 18 latent frames) at 480P and 720P,
#                                float32 / bfloat16, cuDNN's autotuner off / on, NCDHW / NDHWC: the window's time
#                                outside the transformer is mostly this
# carry: .whl/ (diffusers, torchao; fa3-fwd when the compile row should run on FA3) and .whl_av/ (PyAV, pyloudnorm,
# soxr, ftfy: without PyAV the writing columns stay empty); both install to .site/ (bench/device_env.sh: a warm machine
# keeps it for the next row). ATTENTION=<backend> runs the compile / fast presets on that attention backend. JSON (and a
# .partial.json after every clip, what a time limit leaves) goes to $OUT (else bench_out/). AVATAR_SUITE_DRY_RUN=1
# prints the command instead (tests/test_bench_scripts.py checks it against avatar_run.py's parser).
set -uo pipefail
row=${1:?row: fast, compile, default, 720p_fast, 720p_compile, 720p_default or vae}
out=${OUT:-bench_out}
dry=${AVATAR_SUITE_DRY_RUN:-}
case $row in
  fast|compile|default) preset=$row; size=(--seconds 30); limit=560 ;;
  720p_fast|720p_compile|720p_default) preset=${row#720p_}; size=(--resolution 720P --seconds 5.8); limit=520 ;;
  vae) limit=400 ;;
  *) echo "unknown row $row" >&2 && exit 2 ;;
esac
attention=()
[[ -n ${ATTENTION:-} && ${preset:-} != default ]] && attention=(--attention-backend "$ATTENTION")
if [[ $row == vae ]]; then
  command=(timeout "$limit" python3 bench/bench_vae.py --avatar --resolutions 480P 720P --encode-frames 81 --frames 18
    --tilings none --dtypes float32 bfloat16 --cudnn-benchmark off on --channels-last off on
    --json "$out/avatar_vae.json")
else
  command=(timeout "$limit" python3 bench/avatar_run.py --preset "$preset" "${size[@]}" "${attention[@]}"
    --no-check-exact --json "$out/avatar_${row}.json")
fi
if [[ -n $dry ]]; then
  echo "${command[*]}"
  exit 0
fi
mkdir -p "$out"
source bench/device_env.sh
install_wheels .whl_av
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null
"${command[@]}" 2>&1 | grep -v '^Warn\|Attention backends'
