#!/usr/bin/env python
"""Self-attention kernels at the real token counts of one transformer forward (40 heads x 128, bf16): time per
call and output difference from cuDNN (the default, exact path).

    PYTHONPATH=src python bench/bench_attention.py --shapes reference_720P avatar_480P --json attention.json

Kernels: PyTorch SDPA forced to cuDNN / flash / memory-efficient (diffusers' `_native_*` backends) and, when the
package is installed, SageAttention's `sageattn` (8-bit QK). `--tiny --device cpu` checks the script.

The kernel table (`--tokens` switches to it): for each token count and head count, cuDNN SDPA (the exact default)
against FlashAttention-3 and the 8-bit kernels (`--modes`): time per call (the 8-bit rows with their input
preparation; that preparation alone in its own column), TFLOP/s, ratio to cuDNN, and the relative error against
float32 attention (memory-efficient SDPA in float32 on the first `--error-queries` queries of two heads) on each
input suite (`--suites`):

* `gaussian`: q, k, v ~ N(0, 1) (the output is a near-zero average of many values: the hardest case for 8 bits);
* `outlier`: a per-channel K mean of std 2, four channels of Q and K with mean 3 and std 5, V with a channel mean;
* `trained`: what trained video attention looks like: Q and K share a per-head direction under 3-D RoPE on the
  latent grid (rows peak on nearby tokens: low entropy), four sink tokens every query attends to (their V small),
  four K channels with a large constant offset, V with a channel mean. Its row statistics (score gap, top-1
  probability, effective keys, sink mass) are printed and stored.

Modes: `fa3` (FA3 bf16, exact), `fa3_fp8_naive` (FA3 FP8, plain cast, descale 1), `fa3_fp8_scaled` (per-head
descales, K and V smoothed), `fa3_fp8` (also Q/K Hadamard-rotated: the `fa3_fp8` backend; `fa3_fp8_compiled`: the
same under `torch.compile`, its preparation fused as under `--fast`), and ours `QK_PV[_rot]`
(`int8_fp8` = `triton_8bit`, `int8_bf16` = `triton_8bit_accurate`; `_rot`: Q/K Hadamard-rotated; `_exp16`, `_mulp`,
`_nocomp`: older variants). A mode that cannot run (FA3 not installed) gets a row with its error.

    PYTHONPATH=src python bench/bench_attention.py --tokens 75600 --heads 40 --json kernels.json
    PYTHONPATH=src python bench/bench_attention.py --tokens 75600 --heads 40 --modes int8_fp8 --configs  # tile configs
    TRITON_INTERPRET=1 PYTHONPATH=src python bench/bench_attention.py --device cpu --tokens 130 --heads 1  # smoke

`--emulate` (CPU): no timing; each mode's error from its quantisation math in float32 PyTorch (`emulated_attention`)
on the first `--error-queries` queries of two heads: what the kernels should give, before a GPU run.

    PYTHONPATH=src python bench/bench_attention.py --device cpu --emulate --tokens 75600 --error-queries 256 \
        --modes fa3_fp8_naive fa3_fp8_scaled fa3_fp8 int8_fp8 int8_fp8_nocomp int8_fp8_rot int8_bf16 int8_bf16_rot
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transformer import SHAPES, add_run_arguments, device_name, sync, write_json  # noqa: E402


KERNELS = ("_native_cudnn", "_native_flash", "_native_efficient", "sage")


def attention(kernel: str, q, k, v):
    if kernel == "sage":
        from sageattention import sageattn

        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(q, k, v, backend=kernel)


SUITES = ("gaussian", "outlier", "trained")
FA3_MODES = {  # mode -> fa3_fp8_attention options (None: FA3 in bf16)
    "fa3": None,
    "fa3_fp8_naive": dict(scaled=False, smooth_k=False, rotate_qk=False, smooth_v=False),
    "fa3_fp8_scaled": dict(scaled=True, smooth_k=True, rotate_qk=False, smooth_v=True),
    "fa3_fp8": None,  # the backend's own options (attention_backends.FA3_FP8_OPTIONS), filled in at use
    "fa3_fp8_compiled": None,  # the same under torch.compile: the preparation fused by Inductor, as under --fast
}
OUR_MODES = (
    "int8_fp8",
    "int8_bf16",
    "int8_fp8_rot",
    "int8_bf16_rot",
    "fp8_fp8",
    "fp8_bf16",
    "int8_fp8_exp16",
    "int8_fp8_mulp",
    "int8_fp8_nocomp",
)
MODES = (*FA3_MODES, *OUR_MODES)
DEFAULT_MODES = ("fa3", "fa3_fp8_naive", "fa3_fp8_scaled", "fa3_fp8", "int8_fp8", "int8_bf16", "int8_fp8_rot")


def grid_positions(tokens: int, device) -> torch.Tensor:
    """(frame, row, column) of each token on a 16:9 latent grid of 21 frames (75,600 = 21 x 45 x 80, the 720P
    avatar clip); one frame below 1,344 tokens. Float `(tokens, 3)`."""
    frames = 21 if tokens >= 21 * 64 else 1
    per_frame = -(-tokens // frames)
    width = max(1, round((per_frame * 16 / 9) ** 0.5))
    height = -(-per_frame // width)
    i = torch.arange(tokens, device=device)
    return torch.stack([i // (height * width), (i // width) % height, i % width], -1).float()


def rope_3d(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The model's 3-D RoPE on `(1, L, H, D)`: channel pairs split 44/42/42 over frame/row/column, theta 10,000."""
    dim = x.shape[-1]
    sizes = (dim - 4 * (dim // 6), 2 * (dim // 6), 2 * (dim // 6))
    angles = torch.cat(
        [
            positions[:, axis : axis + 1] / 10000 ** (torch.arange(0, n, 2, device=x.device).float() / n)
            for axis, n in enumerate(sizes)
        ],
        -1,
    )[None, :, None]
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)


def make_trained(tokens: int, heads: int, g: torch.Generator, dim: int = 128, sinks: int = 4):
    """The `trained` suite (module docstring), fp32. Its constants give rows at 75,600 tokens a score gap (max -
    median) of about 16, top-1 probability 0.2, ~115 effective keys and half the mass on the sinks (the sink weight
    is steep: 0.95 instead of 1.0 gives 0.28 of the mass, 1.1 gives 0.91)."""
    device = g.device

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g)

    positions = grid_positions(tokens, device)
    shared = randn(1, 1, heads, dim)  # the head's common direction: under RoPE, nearby tokens score highest
    q = rope_3d(0.6 * randn(1, tokens, heads, dim) + 1.6 * shared, positions)
    k = rope_3d(0.6 * randn(1, tokens, heads, dim) + 1.6 * shared, positions)
    sink = randn(1, 1, heads, dim)
    q += sink
    k[:, :sinks] = 2.5 * sink + 0.3 * randn(1, sinks, heads, dim)
    channels = torch.randperm(dim, device=device, generator=g)[:4]
    k[..., channels] += 6.0 * torch.sign(randn(1, 1, heads, 4))
    v = randn(1, tokens, heads, dim) + 0.5 * randn(1, 1, heads, dim)
    v[:, :sinks] *= 0.2
    return q, k, v


def make_qkv(tokens: int, heads: int, inputs: str, device, seed: int = 0):
    """bf16 (1, tokens, heads, 128) q, k, v of a suite: `gaussian`, `outlier` or `trained` (module docstring)."""
    g = torch.Generator(device).manual_seed(seed)
    if inputs == "trained":
        return tuple(x.to(torch.bfloat16) for x in make_trained(tokens, heads, g))
    q, k, v = (torch.randn(1, tokens, heads, 128, device=device, generator=g) for _ in range(3))
    if inputs == "outlier":
        k += 2.0 * torch.randn(1, 1, heads, 128, device=device, generator=g)
        v += torch.randn(1, 1, heads, 128, device=device, generator=g)
        channels = torch.randperm(128, device=device, generator=g)[:4]
        for x in (q, k):
            x[..., channels] = 3.0 + 5.0 * x[..., channels]
    return tuple(x.to(torch.bfloat16) for x in (q, k, v))


def time_ms(fn, repeats: int, device: torch.device) -> float:
    """Median of `repeats` timed calls after one warm-up, in ms."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def reference_attention(q, k, v, queries: int) -> torch.Tensor:
    """float32 attention of the first `queries` queries of the first two heads, `(1, queries, 2, D)`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads = slice(0, min(2, q.shape[2]))
    qs, ks, vs = (x[:, : queries if x is q else None, heads].transpose(1, 2).float() for x in (q, k, v))
    backend = SDPBackend.EFFICIENT_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)


def relative_error(out, reference: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| on the queries and heads of `reference` (`reference_attention`)."""
    got = out[:, : reference.shape[1], : reference.shape[2]].float()
    return ((got - reference).norm() / reference.norm()).item()


def row_statistics(q, k, queries: int) -> dict:
    """How peaked the rows of a suite are (first `queries` queries, two heads): mean score gap (max - median, in
    nats), mean top-1 probability, median effective number of keys (exp of the entropy), mean mass on the first
    four tokens (the `trained` suite's sinks)."""
    heads = slice(0, min(2, q.shape[2]))
    scores = torch.einsum("bqhd,bkhd->bhqk", q[:, :queries, heads].float(), k[:, :, heads].float())
    scores = scores / q.shape[-1] ** 0.5
    p = scores.softmax(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return dict(
        score_gap=round((scores.amax(-1) - scores.median(-1).values).mean().item(), 2),
        top1=round(p.amax(-1).mean().item(), 3),
        effective_keys=round(entropy.exp().median().item(), 1),
        sink_mass=round(p[..., :4].sum(-1).mean().item(), 3),
    )


def mode_options(mode: str) -> dict:
    """Ours: `"qk_pv[_suffix]"` -> attention_8bit_impl's options; `_rot` rotates Q/K, `_exp16` computes P with the
    f16x2 `ex2`, `_mulp` scales P into FP8's range with a multiply per score (the kernel before 2026-11-29's second
    run), `_nocomp` leaves V's mean rounding error in (the kernel before the FA3 comparison)."""
    qk, pv, *rest = mode.split("_")
    return dict(
        qk=qk,
        pv=pv,
        fast_exp=rest == ["exp16"],
        fold_p_scale=rest != ["mulp"],
        rotate=rest == ["rot"],
        compensate_v=rest != ["nocomp"],
    )


def kernel_calls(mode: str, config=None):
    """(the whole call, the input preparation alone or None) of a mode, each `fn(q, k, v)`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if mode == "cudnn":

        def cudnn(q, k, v):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.MATH):
                qkv = (x.transpose(1, 2) for x in (q, k, v))
                return torch.nn.functional.scaled_dot_product_attention(*qkv).transpose(1, 2)

        return cudnn, None
    if mode in FA3_MODES:
        from skyreels_diffusers.models import attention_backends as fa3

        fa3._fa3_function()  # FA3 missing: an ImportError naming how to install it (the row records it)
        if mode == "fa3":
            return (lambda q, k, v: fa3.fa3_attention(q, k, v)[0]), None
        options = FA3_MODES[mode] or fa3.FA3_FP8_OPTIONS
        call = functools.partial(fa3.fa3_fp8_attention, **options)
        prepare = functools.partial(fa3.quantize_fp8_inputs, **options)
        if mode.endswith("_compiled"):
            call, prepare = (torch.compile(f, fullgraph=True) for f in (call, prepare))
        return (lambda q, k, v: call(q, k, v)[0]), prepare
    from skyreels_diffusers.kernels.attention_8bit import attention_8bit_impl, quantize_qkv

    options = mode_options(mode)
    return (
        lambda q, k, v: attention_8bit_impl(q, k, v, config=config, **options),
        lambda q, k, v: quantize_qkv(q, k, v, options["qk"], options["pv"], compensate_v=options["compensate_v"]),
    )


def measure_mode(mode: str, config, suites: dict, references: dict, args, device) -> dict:
    """One row's numbers for one kernel: ms and preparation ms on the Gaussian inputs, the error on every suite."""
    call, prepare = kernel_calls(mode, config)
    row = {
        f"rel_error_{suite}": round(relative_error(call(*qkv), references[suite]), 5) for suite, qkv in suites.items()
    }
    q, k, v = suites.get("gaussian", next(iter(suites.values())))
    row["ms"] = time_ms(lambda: call(q, k, v), args.repeats, device)
    row["prepass_ms"] = None if prepare is None else round(time_ms(lambda: prepare(q, k, v), args.repeats, device), 2)
    return row


def emulated_attention(mode: str, q, k, v, queries: int) -> torch.Tensor:
    """A mode's quantisation math in float32 PyTorch on the first `queries` queries (CPU: no FA3, no Triton): FA3's FP8
    kernel as `fa3_fp8_attention` prepares its inputs, P = 2^(s - max + 8) rounded to e4m3 (FA3's `Max_offset`), the
    row sum of the unrounded P; ours as `reference_attention_8bit` (P against the row maximum, not the running one).
    Rounding inside the MMAs and the kernels' own orders of summation are not modelled."""
    from skyreels_diffusers.models import attention_backends as fa3

    if mode in OUR_MODES:
        from skyreels_diffusers.kernels.attention_8bit import reference_attention_8bit

        options = mode_options(mode)
        return reference_attention_8bit(
            q[:, :queries], k, v, None, options["qk"], options["pv"], options["rotate"], options["compensate_v"]
        )
    if mode == "fa3":  # exact: the output's rounding to bf16
        return reference_attention(q, k, v, queries).to(q.dtype).float()
    pre = fa3.quantize_fp8_inputs(q, k, v, **(FA3_MODES[mode] or fa3.FA3_FP8_OPTIONS))

    def dequantised(name):
        x, descale = pre[name].float(), pre[f"{name}_descale"]
        return x if descale is None else x * descale[:, None, :, None]

    scores = torch.einsum("bqhd,bkhd->bhqk", dequantised("q")[:, :queries], dequantised("k"))
    scores = scores * (pre["softmax_scale"] * 1.4426950408889634)  # log2 units, as the kernel's exp2
    p = torch.exp2(scores - scores.amax(-1, keepdim=True) + 8)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(torch.float8_e4m3fn).float(), dequantised("v"))
    out = (out / p.sum(-1).permute(0, 2, 1)[..., None]).to(q.dtype).float()
    return out if pre["v_mean"] is None else out + pre["v_mean"].float()


def emulated_table(args) -> list[dict]:
    """`--emulate`: each mode's error from its quantisation math (`emulated_attention`), two heads, no timing."""
    rows = []
    for tokens in args.tokens:
        suites = {suite: make_qkv(tokens, 2, suite, args.device) for suite in args.suites}
        row_stats = {suite: row_statistics(*qkv[:2], args.error_queries) for suite, qkv in suites.items()}
        print(f"rows at {tokens} tokens:", json.dumps(row_stats), flush=True)
        for mode in args.modes:
            row = dict(tokens=tokens, heads=2, kernel=mode, emulated=True, queries=args.error_queries)
            for suite, (q, k, v) in suites.items():
                reference = reference_attention(q, k, v, args.error_queries)
                out = emulated_attention(mode, q[:, :, :2], k[:, :, :2], v[:, :, :2], args.error_queries)
                row[f"rel_error_{suite}"] = round(relative_error(out, reference), 5)
            row.update(row_statistics=row_stats, device=device_name(torch.device(args.device)))
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_json(args.json, rows)
    errors = " | ".join(f"rel. err. {suite}" for suite in args.suites)
    print(f"\n| tokens | kernel (emulated) | {errors} |\n|---|---|" + "---|" * len(args.suites))
    for r in rows:
        cells = " | ".join(f"{100 * r[f'rel_error_{suite}']:.2f}%" for suite in args.suites)
        print(f"| {r['tokens']} | {r['kernel']} | {cells} |")
    return rows


def kernel_table(args) -> list[dict]:
    """cuDNN SDPA against every `--modes` kernel at every (heads, tokens): ms, TFLOP/s, ratio, errors per suite."""
    from skyreels_diffusers.kernels.attention_8bit import CONFIGS

    rows, device = [], torch.device(args.device)
    for heads in args.heads:
        for tokens in args.tokens:
            flops = 4 * tokens**2 * heads * 128
            suites = {suite: make_qkv(tokens, heads, suite, args.device) for suite in args.suites}
            references = {suite: reference_attention(*qkv, args.error_queries) for suite, qkv in suites.items()}
            stats = {suite: row_statistics(*qkv[:2], args.error_queries) for suite, qkv in suites.items()}
            print(f"rows at {tokens} tokens x {heads} heads:", json.dumps(stats), flush=True)
            base_ms = None
            for mode in ("cudnn", *args.modes):
                configs = CONFIGS if args.configs and mode in OUR_MODES else [None]
                for config in configs:
                    name = mode if config is None else f"{mode}{list(config)}"
                    row = dict(tokens=tokens, heads=heads, kernel=name)
                    try:
                        row.update(measure_mode(mode, config, suites, references, args, device))
                    except Exception as error:  # a kernel that does not install or build here: recorded
                        row["error"] = f"{type(error).__name__}: {error}"[:300]
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        write_json(args.json, rows)
                        continue
                    base_ms = row["ms"] if mode == "cudnn" else base_ms
                    row.update(
                        ms=round(row["ms"], 2),
                        tflops=round(flops / row["ms"] / 1e9, 1),
                        vs_cudnn=round(base_ms / row["ms"], 3),
                        row_statistics=stats,
                        device=device_name(device),
                        date=time.strftime("%Y-%m-%d"),
                    )
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    write_json(args.json, rows)  # rows are kept as they come (a device call may end early)
            del suites, references
    print_kernel_table(rows, args.suites)
    return rows


def print_kernel_table(rows: list[dict], suites) -> None:
    from skyreels_diffusers.kernels.attention_8bit import TUNING

    for key, timings in TUNING.items():
        print("tile configs timed at the first call", dict(key), {str(c): t for c, t in timings.items()})
    errors = " | ".join(f"rel. err. {suite}" for suite in suites)
    print(f"\n| heads | tokens | kernel | ms | TFLOP/s | vs cuDNN | prep. ms | {errors} |")
    print("|---" * (7 + len(suites)) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['heads']} | {r['tokens']} | {r['kernel']} | failed: {r['error'][:100]} |")
            continue
        prep = "-" if r["prepass_ms"] is None else r["prepass_ms"]
        cells = " | ".join(f"{100 * r[f'rel_error_{suite}']:.2f}%" for suite in suites)
        print(
            f"| {r['heads']} | {r['tokens']} | {r['kernel']} | {r['ms']} | {r['tflops']} | {r['vs_cudnn']}x | "
            f"{prep} | {cells} |"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", nargs="+", default=["reference_720P"], help="variant_resolution keys of bench_transformer.SHAPES"
    )
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="the kernel table at these lengths")
    parser.add_argument("--heads", type=int, nargs="+", default=[40], help="kernel table: head counts")
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES, help="kernel table: kernels")
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES, help="kernel table: inputs")
    parser.add_argument("--configs", action="store_true", help="kernel table: time our kernel at every tile config")
    parser.add_argument(
        "--emulate",
        action="store_true",
        help="kernel table: errors from each mode's quantisation math in PyTorch (CPU; two heads, no timing)",
    )
    parser.add_argument("--error-queries", type=int, default=2048)
    add_run_arguments(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tokens:
        write_json(args.json, emulated_table(args) if args.emulate else kernel_table(args))
        return 0
    device = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        variant, resolution = shape.rsplit("_", 1)
        frames, height, width = SHAPES[(variant, resolution)]
        tokens = 64 if args.tiny else frames * height * width // 4
        g = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(1, tokens, 40, 128, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
        reference = None
        for kernel in args.kernels:
            try:
                out = attention(kernel, q, k, v)
            except Exception as error:  # a kernel that does not install or run here is recorded, not fatal
                rows.append(
                    dict(shape=shape, tokens=tokens, kernel=kernel, error=f"{type(error).__name__}: {error}"[:300])
                )
                print(json.dumps(rows[-1]), flush=True)
                continue
            times = []
            for _ in range(args.repeats):
                sync(device)
                start = time.perf_counter()
                attention(kernel, q, k, v)
                sync(device)
                times.append((time.perf_counter() - start) * 1e3)
            ms = sorted(times)[len(times) // 2]
            if reference is None:
                reference, reference_ms = out.float(), ms
            rel = ((out.float() - reference).norm() / reference.norm()).item()
            tflops = 4 * tokens * tokens * 40 * 128 / (ms / 1e3) / 1e12
            rows.append(
                dict(
                    shape=shape,
                    tokens=tokens,
                    kernel=kernel,
                    ms=round(ms, 2),
                    tflops=round(tflops, 1),
                    vs_first=round(ms / reference_ms, 3),
                    rel_diff_vs_first=round(rel, 5),
                    device=device_name(device),
                    date=time.strftime("%Y-%m-%d"),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
