"""The benchmark scripts run on the GPU machine with little time to spare, so CI runs each on the tiny configs
(`--tiny --device cpu`) to keep them working: they must finish, and their JSON must hold the cases asked for with
sane values (the numbers themselves are measurements, not asserted)."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import torchrun_command


ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_bench_transformer_modes(tmp_path):
    out = tmp_path / "t.json"
    run_script(
        "bench_transformer.py",
        "--tiny",
        "--device",
        "cpu",
        "--variants",
        "reference",
        "--resolutions",
        "480P",
        "--modes",
        "baseline",
        "compile",
        "fp8_weight_only",
        "--layers",
        "1",
        "--json",
        str(out),
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["baseline", "compile", "fp8_weight_only"]
    assert all(r["tokens"] == 5 * 8 * 12 // 4 and r["median_ms"] > 0 for r in rows)
    assert all(r["layers"] == 1 and r["rel_error_vs_baseline"] == r["rel_error"] for r in rows)
    assert rows[0]["compiled_graphs"] == 0 and rows[1]["compiled_graphs"] >= 1  # the eager mode compiles nothing
    errors = {r["mode"]: r["rel_error"] for r in rows}
    assert errors["baseline"] == 0 and errors["compile"] < 0.02 and 0 < errors["fp8_weight_only"] < 0.2


@pytest.mark.slow
def test_bench_gguf_settings(tmp_path):
    out = tmp_path / "g.json"
    run_script(
        "bench_gguf.py",
        "--tiny",
        "--device",
        "cpu",
        "--cases",
        "reference:720P",
        "avatar:480P",
        "--layers",
        "1",
        "--repeats",
        "1",
        "--weights",
        "bf16",
        "gguf_q8_0",
        "gguf_q4_0_group",
        "--json",
        str(out),
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["weights"]) for r in rows] == [
        (v, w) for v in ("reference", "avatar") for w in ("bf16", "gguf_q8_0", "gguf_q4_0_group")
    ]
    errors = {(r["variant"], r["weights"]): r["rel_error_vs_bf16"] for r in rows}
    assert all(
        errors[(v, "bf16")] == 0
        and 0 < errors[(v, "gguf_q8_0")] < 0.02
        and errors[(v, "gguf_q8_0")] < errors[(v, "gguf_q4_0_group")] < 0.2
        for v in ("reference", "avatar")
    )


@pytest.mark.slow
def test_bench_fp8_scaled_files(tmp_path):
    out = tmp_path / "f.json"
    run_script(
        "bench_fp8_scaled.py",
        "--tiny", "--device", "cpu", "--cases", "avatar:480P", "--layers", "1", "--warmup", "0", "--repeats", "1",
        "--weights", "bf16", "fp8_weight_only", "fp8_scaled", "fp8_scaled_dequant", "fp8_scaled_low_vram",
        "--bf16-file", "--avatar-seconds", "1", "--steps", "1", "--folder", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    transformer = {r["weights"]: r for r in rows if r["part"] == "transformer"}
    assert list(transformer) == ["bf16", "fp8_weight_only", "fp8_scaled", "fp8_scaled_dequant", "fp8_scaled_low_vram"]
    errors = {w: r["rel_error_vs_bf16"] for w, r in transformer.items()}
    assert errors["bf16"] == 0 and all(0 < errors[w] < 0.1 for w in list(errors)[1:])
    assert abs(errors["fp8_scaled"] - errors["fp8_scaled_dequant"]) < 5e-3  # the same dequantised weights
    stored = {w: r["stored_weights_bytes"] for w, r in transformer.items()}
    assert stored["fp8_scaled"] < stored["bf16"] == stored["fp8_scaled_dequant"]
    assert transformer["fp8_scaled"]["file_gib"] is not None and transformer["bf16"]["file_gib"] is not None
    pipeline = [r for r in rows if r["part"] == "pipeline"]
    assert [r["setting"] for r in pipeline] == ["bf16_low_vram", "fp8_scaled_low_vram"]
    assert pipeline[0]["frames"] == pipeline[1]["frames"] > 0 and math.isfinite(
        pipeline[1]["rel_diff_vs_bf16_low_vram"]
    )
    assert not list(tmp_path.glob("fp8_scaled_*/*.safetensors"))  # the files are removed


@pytest.mark.slow
def test_bench_pipeline_components(tmp_path):
    out = tmp_path / "p.json"
    run_script(
        "bench_pipeline.py",
        "--tiny",
        "--device",
        "cpu",
        "--tasks",
        "reference_to_video",
        "--seconds",
        "1",
        "--json",
        str(out),
    )
    (row,) = json.loads(out.read_text())
    assert row["frames"] == 25 and row["mode"] == "resident"
    assert {"text_encoder", "vae_encoder", "transformer", "vae_decoder"} <= set(row["component_s"])
    assert 0 < row["outside_transformer_share"] < 1


@pytest.mark.slow
def test_bench_attention_kernels(tmp_path):
    out = tmp_path / "a.json"
    run_script(
        "bench_attention.py",
        "--tiny",
        "--device",
        "cpu",
        "--kernels",
        "_native_math",
        "native",
        "_native_efficient",
        "--repeats",
        "1",
        "--json",
        str(out),
    )
    rows = {r["kernel"]: r for r in json.loads(out.read_text())}
    assert rows["_native_math"]["rel_diff_vs_first"] == 0
    assert 0 <= rows["native"]["rel_diff_vs_first"] < 1e-2  # SDPA's CPU choice vs the math kernel, both bf16
    assert "error" in rows["_native_efficient"]  # no CPU kernel: recorded, not fatal


def test_bench_attention_kernel_table(tmp_path, monkeypatch):
    """The kernel table on CPU, in-process: our kernel in Triton's interpreter, FA3 through the PyTorch stand-in with
    its calling convention (tests/models/fa3_stub), three input suites: every (heads, tokens, kernel) row, sane
    values; without FA3 its rows record the error instead."""
    pytest.importorskip("triton")
    from skyreels_diffusers.models import attention_backends

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs Triton's interpreter (set by conftest on CPU machines)")
    bench = load_bench_script("bench_attention.py")
    out = tmp_path / "k.json"
    modes = ["fa3", "fa3_fp8_naive", "fa3_fp8", "fa3_fp8_compiled", "int8_fp8"]
    args = ["--device", "cpu", "--tokens", "130", "--heads", "1", "--repeats", "1", "--error-queries", "32"]
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "models" / "fa3_stub"))
    monkeypatch.delitem(sys.modules, "fa3_fwd_interface", raising=False)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    attention_backends.reset_fa3_discovery()
    try:
        assert bench.main([*args, "--modes", *modes, "--json", str(out)]) == 0
        rows = json.loads(out.read_text())
        assert [r["kernel"] for r in rows] == ["cudnn", *modes]
        assert all(r["tokens"] == 130 and r["heads"] == 1 and r["ms"] > 0 and "error" not in r for r in rows)
        assert rows[0]["prepass_ms"] is None and rows[1]["prepass_ms"] is None
        assert all(r["prepass_ms"] > 0 for r in rows[2:])
        for r in rows:
            errors = [r[f"rel_error_{suite}"] for suite in ("gaussian", "outlier", "trained")]
            assert all(0 < e < (0.01 if r["kernel"] in ("cudnn", "fa3") else 0.15) for e in errors), r
        stats = rows[0]["row_statistics"]
        assert stats["trained"]["top1"] > 3 * stats["gaussian"]["top1"]  # peaked rows
        assert stats["trained"]["sink_mass"] > 2 * stats["gaussian"]["sink_mass"]  # the sinks draw weight
        monkeypatch.setitem(sys.modules, "fa3_fwd_interface", None)
        attention_backends.reset_fa3_discovery()
        assert bench.main([*args, "--modes", "fa3", "--suites", "gaussian", "--json", str(out)]) == 0
        rows = json.loads(out.read_text())
        assert "rel_error_gaussian" in rows[0] and "FlashAttention-3 is not installed" in rows[1]["error"]
    finally:
        attention_backends.reset_fa3_discovery()


def test_bench_linear_covers_every_block_linear(tmp_path):
    out = tmp_path / "l.json"
    run_script(
        "bench_linear.py",
        "--tiny",
        "--device",
        "cpu",
        "--variants",
        "avatar",
        "--resolutions",
        "480P",
        "--modes",
        "bf16",
        "fp8_weight_only",
        "--repeats",
        "1",
        "--json",
        str(out),
    )
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["bf16", "fp8_weight_only"]
    names = set(rows[0]["per_linear_ms"])
    assert {"attn1.to_q", "attn2.add_k_proj", "attn_audio.to_k", "ffn.net.2"} <= names and len(names) == 16
    assert rows[0]["speedup_vs_bf16"] == 1.0 and math.isfinite(rows[1]["speedup_vs_bf16"])


@pytest.mark.slow
def test_bench_linear_fused_mode_times_the_fused_projections(tmp_path):
    out = tmp_path / "l.json"
    run_script(
        "bench_linear.py",
        "--tiny",
        "--device",
        "cpu",
        "--variants",
        "avatar",
        "--resolutions",
        "480P",
        "--modes",
        "bf16",
        "bf16_fused",
        "--repeats",
        "1",
        "--json",
        str(out),
    )
    unfused, fused = (set(r["per_linear_ms"]) for r in json.loads(out.read_text()))
    separate = {
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.add_k_proj",
        "attn2.add_v_proj",
        "attn_audio.to_k",
        "attn_audio.to_v",
    }
    joined = {"attn1.to_qkv", "attn2.to_kv", "attn2.to_added_kv", "attn_audio.to_kv"}
    assert separate <= unfused and not joined & unfused
    assert fused == (unfused - separate) | joined  # cross-attention queries stay separate


@pytest.mark.slow
def test_bench_parallel_single_process(tmp_path):
    run_script("bench_parallel.py", "--tiny", "--variants", "reference", "avatar", "--out", str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "parallel.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["gpus"]) for r in rows] == [("reference", 1), ("avatar", 1)]
    assert (tmp_path / "reference_720P_tiny_1gpu.pt").is_file()


def speed_suite_stages() -> list[str]:
    text = (ROOT / "bench" / "speed_suite.sh").read_text()
    labels = re.findall(r"^  ([a-z0-9_|]+)\)", text, flags=re.MULTILINE)
    return [stage for label in labels for stage in label.split("|")]


@functools.cache
def load_bench_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def test_speed_suite_stages_pass_their_scripts_parsers(tmp_path):
    """Every stage of bench/speed_suite.sh (one GPU call each) asks its scripts only for arguments, modes and
    shapes they accept: a typo would otherwise cost a device call."""
    stages = speed_suite_stages()
    assert {"fused", "fp8", "lowvram540", "pipeline480_extension", "modes720_avatar"} <= set(stages)
    env = {**os.environ, "SPEED_SUITE_DRY_RUN": "1", "OUT": str(tmp_path)}
    for stage in stages:
        done = subprocess.run(
            ["bash", "bench/speed_suite.sh", stage],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (stage, done.stderr)
        commands = [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]
        assert commands, stage
        for command in commands:
            assert command[:2] == ["python3", f"bench/{Path(command[1]).name}"], command
            script = load_bench_script(Path(command[1]).name)
            args = script.build_parser().parse_args(command[2:])  # exits (fails the test) on a bad argument
            if hasattr(args, "variants"):  # every (variant, resolution) asked for has a shape
                load_bench_script("bench_transformer.py").check_shapes(args.variants, args.resolutions)
            assert str(tmp_path) in (args.json or ""), command  # results land in the device's output folder
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    done = subprocess.run(
        ["bash", "bench/speed_suite.sh", "no_such_stage"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "unknown stage" in done.stderr


def test_bench_attention_emulated_errors(tmp_path):
    """`--emulate`: each mode's quantisation math in PyTorch (no FA3, no Triton): exact FA3 at bf16 rounding, the
    prepared FP8 inputs well below the plain cast on the outlier suite, ours with bf16 P·V below its FP8 P·V."""
    bench = load_bench_script("bench_attention.py")
    out = tmp_path / "e.json"
    modes = ["fa3", "fa3_fp8_naive", "fa3_fp8", "int8_fp8", "int8_bf16"]
    args = ["--device", "cpu", "--emulate", "--tokens", "512", "--error-queries", "64", "--json", str(out)]
    assert bench.main([*args, "--modes", *modes]) == 0
    rows = {r["kernel"]: r for r in json.loads(out.read_text())}
    assert list(rows) == modes and all(r["emulated"] and r["heads"] == 2 for r in rows.values())
    assert all(0 < rows["fa3"][f"rel_error_{suite}"] < 0.005 for suite in ("gaussian", "outlier", "trained"))
    assert rows["fa3_fp8"]["rel_error_outlier"] < 0.5 * rows["fa3_fp8_naive"]["rel_error_outlier"]
    assert rows["int8_bf16"]["rel_error_gaussian"] < 0.5 * rows["int8_fp8"]["rel_error_gaussian"]


def test_fa3_suite_parts_pass_their_scripts_parsers(tmp_path):
    """Every part of bench/fa3_suite.sh (one GPU call each) asks its scripts only for arguments, modes and shapes
    they accept, writes its JSON to the device's output folder and stays under the call limit."""
    text = (ROOT / "bench" / "fa3_suite.sh").read_text()
    parts = re.findall(r"^  ([a-z0-9_]+)\)", text, flags=re.MULTILINE)
    assert parts == ["reference", "avatar", "extension", "extra", "kernels"]
    for fast in ("fast_fa3fp8", "fast_triton", "fast"):
        env = {**os.environ, "FA3_SUITE_DRY_RUN": "1", "OUT": str(tmp_path), "FAST": fast}
        for part in parts:
            done = subprocess.run(
                ["bash", "bench/fa3_suite.sh", part],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, (part, done.stderr)
            commands = [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]
            assert commands, part
            assert sum(int(command[1]) for command in commands) <= 560, part  # timeouts, + install and start-up
            for command in commands:
                assert command[0] == "timeout" and command[2] == "python3", command
                script = load_bench_script(Path(command[3]).name)
                args = script.build_parser().parse_args(command[4:])
                if hasattr(args, "variants"):
                    load_bench_script("bench_transformer.py").check_shapes(args.variants, args.resolutions)
                    assert fast in args.modes and "compile" in args.modes  # the baseline in the same call
                assert str(tmp_path) in (args.json or ""), command
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("attention", ["", "fa3_fp8"])
def test_avatar_suite_rows_pass_avatar_run_parser(tmp_path, attention):
    """Every row of bench/avatar_suite.sh (one GPU call each) asks avatar_run.py only for arguments it accepts, with
    the row's preset and size, under the call limit, its JSON in the device's output folder."""
    text = (ROOT / "bench" / "avatar_suite.sh").read_text()
    rows = [name for line in re.findall(r"^  ([a-z0-9_|]+)\)", text, flags=re.MULTILINE) for name in line.split("|")]
    assert rows == ["fast", "compile", "default", "720p_fast", "720p_compile", "720p_default", "vae"]
    script = load_bench_script("avatar_run.py")
    env = {**os.environ, "AVATAR_SUITE_DRY_RUN": "1", "OUT": str(tmp_path), "ATTENTION": attention}
    for row in rows:
        done = subprocess.run(
            ["bash", "bench/avatar_suite.sh", row], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, (row, done.stderr)
        command = shlex.split(done.stdout)
        if row == "vae":
            assert (
                command[0] == "timeout"
                and int(command[1]) <= 560
                and command[2:4] == ["python3", "bench/bench_vae.py"]
            )
            args = load_bench_script("bench_vae.py").build_parser().parse_args(command[4:])
            assert args.avatar and args.encode_frames == 81 and args.frames == 18
            assert args.dtypes[0] == "float32" and args.cudnn_benchmark[0] == "off"  # the reference row first
            assert args.json == str(tmp_path / "avatar_vae.json")
            continue
        assert (
            command[0] == "timeout" and int(command[1]) <= 560 and command[2:4] == ["python3", "bench/avatar_run.py"]
        )
        args = script.build_parser().parse_args(command[4:])
        assert args.preset == row.removeprefix("720p_")
        assert (args.resolution, args.seconds) == (("720P", 5.8) if row.startswith("720p") else ("480P", 30.0))
        assert args.attention_backend == (attention or None if args.preset != "default" else None)
        assert args.json == str(tmp_path / f"avatar_{row}.json")
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):  # the default preset has no attention backend to choose: asked, it is an error
        script.main(["--preset", "default", "--attention-backend", "fa3", "--json", str(tmp_path / "x.json")])


def test_matrix_takes_each_ratio_from_its_own_run(tmp_path):
    """bench/matrix.py: a cell's ratio divides by the baseline of the same file; a newer file without a baseline does
    not replace a cell that has one, but does fill an empty cell (without a ratio)."""
    matrix = load_bench_script("matrix.py")

    def row(variant, mode, ms):
        return {"variant": variant, "resolution": "480P", "mode": mode, "median_ms": ms, "peak_gib": 1.0}

    (tmp_path / "2026-01-01_a.json").write_text(
        json.dumps({"env": {}, "rows": [row("avatar", "baseline", 400.0), row("avatar", "compile", 320.0)]})
    )
    (tmp_path / "2026-01-02_b.json").write_text(
        json.dumps({"env": {}, "rows": [row("avatar", "compile", 100.0), row("avatar", "group", 500.0)]})
    )
    (tmp_path / "2026-01-03_c.json").write_text(
        json.dumps({"env": {}, "rows": [row("avatar", "default", 1000.0), row("avatar", "low_vram", 1250.0)]})
    )
    (tmp_path / "2026-01-04_pipeline.json").write_text(json.dumps([{"task": "talking_avatar", "total_s": 1.0}]))
    partial = [dict(row("avatar", "baseline", 40.0), layers=4), dict(row("avatar", "compile", 30.0), layers=4)]
    (tmp_path / "2026-01-05_layers.json").write_text(json.dumps({"env": {}, "rows": partial}))  # 4 of 40 blocks
    cells = matrix.collect(tmp_path)
    assert cells[("avatar", "480P", "compile")]["ms"] == 320.0
    assert cells[("avatar", "480P", "compile")]["vs_baseline"] == 1.25
    assert cells[("avatar", "480P", "group")]["vs_baseline"] is None
    assert cells[("avatar", "480P", "low_vram")]["vs_baseline"] == 0.8  # against file c's default == baseline
    table = matrix.markdown(cells)
    assert "| avatar | 480P | 1,000 (1.00x), 1.0 GiB | 320 (1.25x), 1.0 GiB | - | - | 500, 1.0 GiB |" in table
    # the stored measurements: every variant and resolution has a baseline cell with its same-run ratio, and
    # docs/performance.md shows the matrix they make (a new result file must come with its docs update)
    stored = matrix.collect(ROOT / "bench" / "results")
    for variant in matrix.VARIANTS:
        for resolution in matrix.RESOLUTIONS:
            assert stored[(variant, resolution, "baseline")]["vs_baseline"] == 1.0
    assert matrix.markdown(stored) in (ROOT / "docs" / "performance.md").read_text()


@pytest.mark.slow
def test_bench_e2e_stages_and_projections(tmp_path):
    """bench_e2e.py on the tiny configs, one process: every stage is timed, steps are counted per clip, and the
    avatar's 200-s projection uses the windows the pipeline plans for 200 s."""
    out = tmp_path / "e2e.json"
    run_script(
        "bench_e2e.py",
        "--tiny",
        "--device",
        "cpu",
        "--cases",
        "reference_720p",
        "avatar_480p",
        "--steps",
        "1",
        "--json",
        str(out),
    )
    reference, avatar = json.loads(out.read_text())
    assert (reference["case"], reference["gpus"], avatar["case"]) == ("reference_720p", 1, "avatar_480p")
    assert reference["frames"] == 5 and len(reference["step_s"]) == 1
    stages = ("encoders_s", "before_first_step_s", "after_last_step_s", "write_s")
    assert all(reference[k] >= 0 for k in stages) and reference["total_s"] >= sum(reference[k] for k in stages)
    assert reference["projected_total_s"] > reference["total_s"] - sum(reference["step_s"])  # 8 steps projected
    assert avatar["frames"] == 100 and len(avatar["step_s"]) == 3 and len(avatar["window_s"]) == 2  # keyframe + 2
    assert avatar["windows_200s"] == 78 and avatar["projected_200s_s"] > avatar["keyframe_s"]
    assert avatar["vae_encode_compute_s"] > 0 and avatar["vae_decode_compute_s"] > 0


def test_bench_vae_dtypes_and_autotuner_against_the_float32_vae(tmp_path):
    """bench_vae.py on the tiny VAE: a row per resolution x work x dtype x autotuner x memory format; the float32 NCDHW
    rows without the autotuner are the references (speedup 1, no error columns), float32 with it is the same output
    on the CPU (cuDNN's switch does nothing there), channels-last is float32 rounding away and bfloat16 differs."""
    out = tmp_path / "vae.json"
    run_script(
        "bench_vae.py", "--tiny", "--device", "cpu", "--avatar", "--resolutions", "480P", "--encode-frames", "5",
        "--frames", "2", "--tilings", "none", "--dtypes", "float32", "bfloat16", "--cudnn-benchmark", "off", "on",
        "--channels-last", "off", "on", "--json", str(out),
    )  # fmt: skip
    rows = {(r["work"], r["dtype"], r["cudnn_benchmark"], r["channels_last"]): r for r in json.loads(out.read_text())}
    assert len(rows) == 16 and {r["frames"] for k, r in rows.items() if k[0] == "encode"} == {5}
    for work in ("decode", "encode"):
        reference = rows[(work, "float32", "off", "off")]
        assert reference["speedup"] == 1.0 and "rel_l2" not in reference and reference["s"] > 0
        assert rows[(work, "float32", "on", "off")]["rel_l2"] == 0.0  # the autotuner's switch is cuDNN's only
        assert rows[(work, "float32", "off", "on")]["rel_l2"] < 1e-5  # NDHWC: the same sums in another order
        assert all(0 < rows[(work, "bfloat16", b, c)]["rel_l2"] < 1 for b in ("off", "on") for c in ("off", "on"))


@pytest.mark.slow
def test_bench_avatar_run_whole_run_row(tmp_path):
    """avatar_run.py on the tiny configs: one row with every clip's parts, the writer's seconds, the time to the
    first playable second, the exactness checks of the kept-frames decode and colour matching, and the projection."""
    out = tmp_path / "avatar.json"
    run_script("avatar_run.py", "--tiny", "--device", "cpu", "--seconds", "4", "--json", str(out))
    row = json.loads(out.read_text())
    assert (row["frames"], row["windows"], len(row["clips"])) == (100, 2, 3)
    assert [c["frames"] for c in row["clips"]] == [0, 69, 31]  # the keyframe clip, then the windows' new frames
    parts = ("transformer_s", "vae_encode_s", "vae_decode_s", "colour_s", "clip_s", "uint8_s")
    assert all(c[k] >= 0 for c in row["clips"] for k in parts) and all(c["transformer_s"] > 0 for c in row["clips"])
    assert row["clips"][2]["clip_s"] > 0 and row["clips"][1]["clip_s"] == 0  # CLIP of the motion frame: window 1
    assert row["exact_decode"] is True and row["exact_colour"] is True
    assert len(row["write_s"]) == 2 and 0 < row["first_playable_s"] <= row["total_s"]
    assert row["projected_200s_windows"] == 78 and row["projected_200s_s"] > row["keyframe_clip_s"]
    assert row["host_rss_peak_gib"] > 0 and row["preset"] == "default"


@pytest.mark.slow
def test_bench_e2e_two_processes_with_sharded_weights(tmp_path):
    """Under torchrun with 2 gloo processes: Ulysses over both, the parallel VAE, encoders on rank 0 and the
    transformer built on the meta device and sharded (FSDP2); rank 0 writes one row with both ranks' peaks and
    the comparison of its frames with the one-process run's."""
    out = tmp_path / "e2e2.json"
    frames = tmp_path / "frames"
    run_script(
        "bench_e2e.py",
        "--tiny",
        "--device",
        "cpu",
        "--cases",
        "reference_720p",
        "--steps",
        "1",
        "--save-frames",
        str(frames),
        "--json",
        str(tmp_path / "e2e1.json"),
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        torchrun_command(
            str(ROOT / "bench" / "bench_e2e.py"),
            "--tiny",
            "--device",
            "cpu",
            "--cases",
            "reference_720p",
            "--steps",
            "1",
            "--shard-weights",
            "--save-frames",
            str(frames),
            "--json",
            str(out),
        ),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert (row["gpus"], row["ulysses"], row["shard_weights"], row["frames"]) == (2, 2, True, 5)
    assert len(row["peak_gib_per_rank"]) == 2 and len(row["step_s"]) == 1
    # the one-process frames of the same case: the same model (each shard holds its rows of the values the
    # one-process build draws), so the frames agree to float rounding (a level here and there)
    one, two = (np.load(frames / f"reference_720p_default_tiny_{n}gpu.npy") for n in (1, 2))
    assert one.shape == two.shape == (5, 32, 48, 3) and two.dtype == np.uint8
    difference = np.abs(one.astype(int) - two.astype(int))
    assert row["max_abs_diff_vs_1gpu"] == difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_random_components_do_not_depend_on_which_encoders_a_rank_builds():
    """Under torchrun rank 0 alone builds the text and audio encoders: every component the ranks share (the
    transformer, the VAE, CLIP) must get the same random weights on every rank, whatever was built before it, or
    the ranks run different models (the whole-run comparison with one GPU then measures that, not the parallelism)."""
    import torch

    from skyreels_diffusers.app import tiny
    from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS

    bench = load_bench_script("bench_pipeline.py")
    sizes = {
        "text_encoder": tiny.TINY_TEXT_ENCODER_CONFIG,
        "image_encoder": tiny.TINY_CLIP_CONFIG,
        "audio_encoder": tiny.TINY_WAV2VEC2_CONFIG,
        "vae": tiny.TINY_VAE_CONFIG,
        "transformer": TINY_TRANSFORMER_CONFIGS["avatar"],
    }
    main, other = (
        bench.real_components("talking_avatar", "cpu", main_encoders=main, sizes=sizes) for main in (True, False)
    )
    assert main["text_encoder"] is not None and other["text_encoder"] is None and other["audio_encoder"] is None
    for name in ("transformer", "vae", "image_encoder"):
        ours, theirs = main[name].state_dict(), other[name].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


@pytest.mark.parametrize("case", ["reference_720p", "extension_720p", "avatar_480p"])
def test_e2e_suite_rows_pass_bench_e2e_parser(tmp_path, case):
    """Every row of bench/e2e_suite.sh (one device call: the one-GPU baseline, then N GPUs) asks bench_e2e.py for
    arguments it accepts, with the baseline's VAE tiled and JSON in the device's output folder."""
    bench = load_bench_script("bench_e2e.py")
    env = {**os.environ, "E2E_SUITE_DRY_RUN": "1", "OUT": str(tmp_path)}
    for preset in ("default", "compile", "fast", "shard"):
        done = subprocess.run(
            ["bash", "bench/e2e_suite.sh", case, preset, "4"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        one, many = (shlex.split(line) for line in done.stdout.splitlines())
        assert one[:2] == ["python3", "bench/bench_e2e.py"]
        assert many[:6] == ["python3", "-m", "torch.distributed.run", "--nproc_per_node", "4", "bench/bench_e2e.py"]
        baseline, parallel = bench.build_parser().parse_args(one[2:]), bench.build_parser().parse_args(many[6:])
        assert baseline.cases == parallel.cases == [case] and baseline.presets == parallel.presets
        assert baseline.vae_tiling and not baseline.shard_weights and parallel.shard_weights == (preset == "shard")
        assert baseline.save_frames == parallel.save_frames  # the N-GPU row compares with the baseline's frames
        assert str(tmp_path) in baseline.json and str(tmp_path) in parallel.json
    assert not list(tmp_path.iterdir())


def test_bench_serve_statistics():
    """The load figure's arithmetic (the script itself starts Ray: run by hand, docs/serving.md)."""
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "bench_serve.py")
    bench_serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_serve)
    assert bench_serve.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert bench_serve.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    summary = bench_serve.summarize([1.0, 2.0, 3.0], wall_s=30.0, failed=1)
    assert summary["jobs_per_min"] == 6.0 and summary["p50_s"] == 2.0 and summary["failed"] == 1
