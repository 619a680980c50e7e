"""Bad inputs through the real command line (in-process `skyreels_diffusers.app.cli.main`, `--model tiny` or tiny
folders): exit code, the first line the user sees, and whether anything was left in the output folder.

    HF_HUB_OFFLINE=1 PYTHONPATH=src:. python -m tests.reliability.fault_cases [--json out.json]

Prints a Markdown table (the one in docs/reliability.md). Not collected by pytest: it runs a few tiny pipelines.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image


def _wav(path: Path, seconds: float, rate: int = 16000, bits: int = 16) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    if bits == 8:
        data = np.clip(np.round(signal * 128 + 128), 0, 255).astype("u1").tobytes()
    else:
        data = np.round(signal * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * bits // 8, bits // 8, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def _media(root: Path) -> dict[str, Path]:
    from skyreels_diffusers.app.tiny import tiny_pipeline
    from skyreels_diffusers.pipelines.video_io import write_video
    from tests.reliability.test_joined_audio import _mp3
    from tests.reliability.test_video_frame_size import _ts

    m = {}
    m["image"] = root / "face.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(m["image"])
    m["bomb"] = root / "bomb.png"
    PIL.Image.new("1", (20000, 20000)).save(m["bomb"])  # 400 Mpixel, a few hundred kB on disk
    m["thin"] = root / "thin.png"
    PIL.Image.new("RGB", (1, 4000)).save(m["thin"])
    m["text_as_png"] = root / "notes.png"
    m["text_as_png"].write_text("not an image")
    m["truncated_png"] = root / "cut.png"
    m["truncated_png"].write_bytes(m["image"].read_bytes()[:200])
    m["speech"] = _wav(root / "speech.wav", 1.5)
    m["speech_u8"] = _wav(root / "speech_u8.wav", 1.5, bits=8)
    m["long_audio"] = _wav(root / "long.wav", 250.0)
    m["garbage_audio"] = root / "noise.mp3"
    m["garbage_audio"].write_bytes(bytes(range(256)) * 40)
    m["short_audio"] = _wav(root / "short.wav", 0.2)
    frames = np.random.default_rng(1).integers(0, 255, (10, 32, 48, 3), dtype=np.uint8)
    m["short_video"] = write_video(frames, root / "short.mp4", fps=24)
    m["garbage_video"] = root / "clip.mp4"
    m["garbage_video"].write_bytes(b"\x00" * 5000)
    m["file_as_dir"] = root / "resume_file"
    m["file_as_dir"].write_text("x")
    m["garbage_state"] = root / "resume_garbage"
    m["garbage_state"].mkdir()
    (m["garbage_state"] / "state.pt").write_bytes(b"PK\x03\x04 junk" * 30)
    m["joined_mp3"] = root / "joined.mp3"  # 22.05-kHz mono + 44.1-kHz stereo, each 2.05 s with its own tags
    m["joined_mp3"].write_bytes(_mp3(root / "a.mp3", 22050, 1, True) + _mp3(root / "b.mp3", 44100, 2, True))
    m["gray16"] = root / "gray16.png"
    PIL.Image.fromarray((np.arange(64 * 48).reshape(64, 48) * 21).astype(np.uint16)).save(m["gray16"])
    m["size_change"] = root / "joined.ts"  # 30 frames of 48 x 32, then 30 of 64 x 48
    m["size_change"].write_bytes(_ts(root / "a.ts", 48, 32, 30, 60) + _ts(root / "b.ts", 64, 48, 30, 200))
    avatar = tiny_pipeline("talking_avatar")
    m["avatar_folder"] = root / "avatar_folder"
    avatar.save_pretrained(m["avatar_folder"])
    m["dangling"] = root / "link.mp4"
    m["dangling"].symlink_to(root / "gone" / "target.mp4")
    return m


def _damaged(m: dict[str, Path], root: Path) -> dict[str, Path]:
    from safetensors.torch import load_file, save_file

    from skyreels_diffusers.app.tiny import tiny_pipeline
    from tests.conversion.community_files import wan_native_state
    from tests.reliability.test_strict_loading import _drop_offsets

    out = {}
    video = tiny_pipeline("single_shot_extension").transformer
    out["video_transformer"] = root / "video_transformer.safetensors"
    save_file({k: v.contiguous() for k, v in wan_native_state(video).items()}, str(out["video_transformer"]))
    for name in ("te_missing", "vae_truncated", "no_index", "index_list", "null_vae", "no_offsets"):
        out[name] = Path(shutil.copytree(m["avatar_folder"], root / name))
    path = out["te_missing"] / "text_encoder" / "model.safetensors"
    state = load_file(path)
    del state[min(state)]
    save_file(state, path, metadata={"format": "pt"})
    vae = out["vae_truncated"] / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[: vae.stat().st_size // 2])
    (out["no_index"] / "model_index.json").unlink()
    (out["index_list"] / "model_index.json").write_text("[1, 2]")
    index = json.loads((out["null_vae"] / "model_index.json").read_text())
    (out["null_vae"] / "model_index.json").write_text(json.dumps({**index, "vae": [None, None]}))
    _drop_offsets(out["no_offsets"])
    return out


def cases(m: dict[str, Path], d: dict[str, Path]) -> list[tuple[str, list[str]]]:
    avatar = ["--task", "talking_avatar", "--model", "tiny", "--input-image", str(m["image"]), "--steps", "1"]
    ref = ["--task", "reference_to_video", "--model", "tiny", "--steps", "1"]
    ext = ["--task", "single_shot_extension", "--model", "tiny", "--steps", "1"]
    folder_avatar = [
        "--task",
        "talking_avatar",
        "--input-image",
        str(m["image"]),
        "--input-audio",
        str(m["speech"]),
        "--steps",
        "1",
        "--device",
        "cpu",
    ]
    return [
        ("decompression-bomb PNG (20000 x 20000) as --ref-imgs", [*ref, "--ref-imgs", str(m["bomb"])]),
        ("1 x 4000 image as --ref-imgs", [*ref, "--ref-imgs", str(m["thin"])]),
        (
            "text file named .png as --input-image",
            [*avatar, "--input-audio", str(m["speech"]), "--input-image", str(m["text_as_png"])],
        ),
        ("truncated PNG as --ref-imgs", [*ref, "--ref-imgs", str(m["truncated_png"])]),
        ("250-s WAV (limit 200 s) as --input-audio", [*avatar, "--input-audio", str(m["long_audio"])]),
        (
            "250-s WAV with --max-audio-seconds 10",
            [*avatar, "--input-audio", str(m["long_audio"]), "--max-audio-seconds", "10"],
        ),
        ("0.2-s WAV as --input-audio", [*avatar, "--input-audio", str(m["short_audio"])]),
        ("random bytes named .mp3 as --input-audio", [*avatar, "--input-audio", str(m["garbage_audio"])]),
        ("zeros named .mp4 as --input-video", [*ext, "--input-video", str(m["garbage_video"])]),
        ("10-frame video for single-shot extension", [*ext, "--input-video", str(m["short_video"])]),
        (
            "--resume-dir pointing at a file",
            [*avatar, "--input-audio", str(m["speech"]), "--resume-dir", str(m["file_as_dir"])],
        ),
        (
            "--resume-dir with a garbage state.pt",
            [*avatar, "--input-audio", str(m["speech"]), "--resume-dir", str(m["garbage_state"])],
        ),
        (
            "avatar folder with --task reference_to_video",
            [
                "--task",
                "reference_to_video",
                "--model",
                str(m["avatar_folder"]),
                "--ref-imgs",
                str(m["image"]),
                "--steps",
                "1",
                "--device",
                "cpu",
            ],
        ),
        ("folder whose text encoder lacks a weight", [*folder_avatar, "--model", str(d["te_missing"])]),
        ("folder with a truncated VAE safetensors", [*folder_avatar, "--model", str(d["vae_truncated"])]),
        ("folder without model_index.json", [*folder_avatar, "--model", str(d["no_index"])]),
        ("folder whose model_index.json is a JSON list", [*folder_avatar, "--model", str(d["index_list"])]),
        ("folder whose model_index.json has a [null, null] vae", [*folder_avatar, "--model", str(d["null_vae"])]),
        (
            "folder whose VAE safetensors has an entry without offsets",
            [*folder_avatar, "--model", str(d["no_offsets"])],
        ),
        (
            "two mp3s joined: 22-kHz mono + 44-kHz stereo, 4.1 s (valid)",
            [*avatar, "--input-audio", str(m["joined_mp3"]), "--height", "32", "--width", "32"],
        ),
        (
            "16-bit grey PNG as --input-image (valid)",
            [
                *avatar,
                "--input-image",
                str(m["gray16"]),
                "--input-audio",
                str(m["speech"]),
                "--height",
                "32",
                "--width",
                "32",
            ],
        ),
        (
            "video whose frame size changes, 48 x 32 then 64 x 48 (valid)",
            [*ext, "--input-video", str(m["size_change"]), "--height", "32", "--width", "48", "--duration", "1"],
        ),
        (
            "8-bit unsigned WAV (valid input; was decoded with a DC shift)",
            [*avatar, "--input-audio", str(m["speech_u8"]), "--height", "32", "--width", "32"],
        ),
        (f"--output that exists, without --overwrite {EXISTING}", [*ref]),
        (
            f"--output that exists, with --overwrite {EXISTING}",
            [*ref, "--overwrite", "--height", "32", "--width", "32"],
        ),
        ("--output /proc/x.mp4 (not writable)", [*ref, "--output", "/proc/x.mp4"]),
        (
            "a 750-token prompt (valid; the encoder reads 512)",
            [*ref, "--prompt", "word " * 150, "--height", "32", "--width", "32"],
        ),
        ("--height 32 --width 33", [*ref, "--height", "32", "--width", "33"]),
        ("--height 16000 --width 16000", [*ref, "--height", "16000", "--width", "16000"]),
        ("--duration 100000 (reference_to_video)", [*ref, "--duration", "100000"]),
        ("--guidance-scale inf", [*ref, "--guidance-scale", "inf"]),
        ("--guidance-scale 1e30", [*ref, "--guidance-scale", "1e30"]),
        ("--seed -1", [*ref, "--seed", "-1"]),
        ("--device foo", [*ref, "--device", "foo"]),
        ("--device cuda on a machine without CUDA", [*ref, "--device", "cuda"]),
        ("--attention-backend flash without flash-attn", [*ref, "--attention-backend", "flash"]),
        ("--quantize fp8_dynamic on a CPU", [*ref, "--quantize", "fp8_dynamic", "--device", "cpu"]),
        ("--resume-dir with reference_to_video", [*ref, "--resume-dir", str(m["file_as_dir"]) + "_x"]),
        ("--input-audio with reference_to_video", [*ref, "--input-audio", str(m["speech"])]),
        (
            "--ref-imgs with talking_avatar",
            [*avatar, "--input-audio", str(m["speech"]), "--ref-imgs", str(m["image"])],
        ),
        ("--duration with talking_avatar", [*avatar, "--input-audio", str(m["speech"]), "--duration", "3"]),
        (
            "--input-video with talking_avatar",
            [*avatar, "--input-audio", str(m["speech"]), "--input-video", str(m["short_video"])],
        ),
        (
            "--resume-dir on a disk that cannot be written (/proc)",
            [*avatar, "--input-audio", str(m["speech"]), "--resume-dir", "/proc/resume"],
        ),
        (
            "a video (extension) transformer file as --transformer of an avatar folder",
            [*folder_avatar, "--model", str(m["avatar_folder"]), "--transformer", str(d["video_transformer"])],
        ),
        ("--output a symbolic link to a missing file", [*ref, "--output", str(m["dangling"])]),
    ]


#: in a case's label: its --output file exists before the run (a few bytes: "precious")
EXISTING = "(out.mp4 there before)"


def run_case(argv: list[str], out_dir: Path, existing: bool = False) -> dict:
    from skyreels_diffusers.app.cli import main

    out_dir.mkdir(parents=True, exist_ok=True)
    if existing:
        (out_dir / "out.mp4").write_bytes(b"precious")
    err, out = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    output = [] if "--output" in argv else ["--output", str(out_dir / "out.mp4")]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(["generate", *argv, *output])
        except SystemExit as exit_:
            code = exit_.code
        except Exception as error:  # noqa: BLE001 (a traceback is what this table looks for)
            code, err = "traceback", io.StringIO(f"{type(error).__name__}: {error}")
    lines = [
        ln
        for ln in err.getvalue().splitlines()
        if ln.startswith("error:") or "Error" in ln or "tokens; the text encoder" in ln
    ]
    left = sorted(p.name for p in out_dir.iterdir())
    if existing and "out.mp4" in left:
        left[left.index("out.mp4")] = (
            "out.mp4 (" + ("kept" if (out_dir / "out.mp4").read_bytes() == b"precious" else "replaced") + ")"
        )
    return {
        "exit": code,
        "message": (lines or [out.getvalue().strip().splitlines()[-1:] or [""]][0])[0][:300],
        "left_behind": left,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="faults_"))
    try:
        media = _media(root)
        damaged = _damaged(media, root)
        results = []
        for i, (label, argv) in enumerate(cases(media, damaged)):
            result = {"case": label, **run_case(argv, root / f"out{i}", existing=EXISTING in label)}
            results.append(result)
            print(json.dumps(result), flush=True)
        print("\n| input | exit | what the user sees | left in the output folder |\n|---|---|---|---|")
        for r in results:
            message = r["message"].replace(str(root) + "/", "").replace("|", "\\|")
            print(f"| {r['case']} | {r['exit']} | `{message}` | {', '.join(r['left_behind']) or 'nothing'} |")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
