#!/usr/bin/env bash
# One-H200 measurements of the 8-bit Triton attention, in one device call:
#   bash bench/attention_8bit_suite.sh
# 1. probe: do warp-specialised tile configs build and agree with the plain ones? (2026-11-29, Triton 3.6 on an
#    H200: no, the NVGPUWarpSpecialization pass fails; if a Triton builds them, add them to CONFIGS)
# 2. kernel table: cuDNN SDPA vs the kernel (int8_fp8, int8_bf16) at 32,760 / 75,600 / 126,000 / 144,000 tokens,
#    40 / 20 / 10 heads: ms, TFLOP/s, ratio, pre-pass ms, relative error vs float32 on Gaussian and outlier inputs
# 3. whole forward, avatar 720P: compiled bf16 vs compiled with the 8-bit attention backend
# JSON results go to $OUT when set (the device tool's output folder), else to bench_out/.
set -uo pipefail
out=${OUT:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 60 python3 - >"$out/probe.log" 2>&1 <<'PY'
import torch
from skyreels_diffusers.kernels.attention_8bit import attention_8bit_impl
q, k, v = (torch.randn(1, 4096, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
plain = attention_8bit_impl(q, k, v, config=(64, 128, 4, 3)).float()
for config in ((128, 128, 8, 3, True), (64, 128, 4, 3, True)):
    diff = (attention_8bit_impl(q, k, v, config=config).float() - plain).abs().max().item()
    print("warp-specialised", config, "max diff from plain", diff)
    assert diff < 1e-2
PY
grep -v Warn "$out/probe.log" | tail -2
timeout 200 python3 bench/bench_attention.py --tokens 32760 75600 126000 144000 --heads 40 20 10 \
  --modes int8_fp8 int8_bf16 --repeats 2 --error-queries 1024 --json "$out/attention_8bit.json" 2>&1 | grep -v '^{'
timeout 170 python3 bench/bench_transformer.py --variants avatar --resolutions 720P --modes compile attn8 \
  --warmup 1 --repeats 1 --json "$out/transformer_attn8_avatar720.json" 2>&1 | grep -v '^{'
