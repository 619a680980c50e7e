#!/usr/bin/env bash
# GPU scaling suite of bench/bench_parallel.py (one call per stage on a 4-GPU machine, each under 10 minutes):
#   bash bench/parallel_suite.sh reference   # reference 720P on 1/2/4 GPUs, 480P (uneven split) on 1/4,
#                                           # xfuser (Ulysses 2 and 4) and Ulysses x ring 2x2 at 720P
#   bash bench/parallel_suite.sh extension_avatar   # extension and avatar 720P on 1/2/4 GPUs
# Rows go to $RESULTS/parallel.jsonl (default /tmp/bench_parallel; one-GPU outputs are saved there to compare).
# Wheels not on the machine (diffusers, torchao, xfuser and its pure-Python deps) are installed from .whl*/ when
# present (see docs/performance.md).
set -euo pipefail
stage=${1:?stage: reference or extension_avatar}
results=${RESULTS:-/tmp/bench_parallel}
mkdir -p "$results"
source bench/device_env.sh
install_wheels .whl_xfuser
one() { python3 bench/bench_parallel.py --out "$results" "$@"; }
many() { local n=$1; shift; python3 -m torch.distributed.run --nproc_per_node "$n" bench/bench_parallel.py --out "$results" "$@"; }

case $stage in
  reference)
    one --variants reference --resolutions 720P 480P --repeats 1
    many 2 --variants reference --resolutions 720P --ulysses-degree 2 --repeats 1
    many 4 --variants reference --resolutions 720P 480P --ulysses-degree 4 --repeats 2
    many 2 --variants reference --resolutions 720P --ulysses-degree 2 --repeats 1 --parallel-backend xfuser
    many 4 --variants reference --resolutions 720P --ulysses-degree 4 --repeats 2 --parallel-backend xfuser
    many 4 --variants reference --resolutions 720P --ulysses-degree 2 --ring-degree 2 --repeats 2 \
      --attention-backend _native_cudnn
    ;;
  extension_avatar)
    one --variants extension avatar --resolutions 720P --repeats 1
    many 2 --variants extension avatar --resolutions 720P --ulysses-degree 2 --repeats 1
    many 4 --variants extension avatar --resolutions 720P --ulysses-degree 4 --repeats 2
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
