"""Worker of the real-size whole-run tests: one task's whole run through `app.run.run` (what `skyreels-v3 generate`
does; under torchrun: the text/audio encoders once on rank 0, Ulysses over every rank, the parallel VAE and
`--shard-weights`) at the real shapes of a run (720P reference, extension and shot switching, the avatar's 480P
81-frame windows: their token counts, reference and condition frames, bucket sizes and VAE tile grids) with narrow
components (the tiny 2-layer transformer, a 2-channel Wan VAE) in float32 on CPU.

    python -m tests.parallel.real_size_worker OUT INPUTS TASK PROFILE                      # one process: OUT/single
    torchrun --nproc_per_node 2 -m tests.parallel.real_size_worker OUT INPUTS TASK PROFILE  # OUT/rank0.json, ...

Every stage is recorded: each transformer call's inputs (noise and condition latents, timesteps, text / image /
audio embeddings) and output, the latents after every step, every decoded clip (floats, before uint8) and the
written mp4's frames. The one-process run (VAE tiled with the same tiles as the parallel VAE) saves them whole;
each rank of the parallel run compares its own with them and writes, per stage, the largest absolute and the
relative difference (`compare`), the first stage that parts first.
"""

from __future__ import annotations

import json
import os
import sys
import time
import wave
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


#: the shapes of real runs: (height, width, seconds) per task; "full" is the runs of `bench/bench_e2e.py`
#: (5-s 720P reference and extension, the avatar's keyframe clip and one window), "ci" keeps every real spatial
#: shape and the avatar's 81-frame windows but 1-s reference / extension clips (the token count per frame, the
#: reference and condition frames and the VAE's tile grids are the real ones; fewer frames only)
PROFILES = {
    "full": {
        "reference_to_video": (720, 1280, 5),
        "single_shot_extension": (720, 1280, 5),
        "shot_switching_extension": (720, 1280, 2),
        "talking_avatar": (480, 832, 3.24),
    },
    "ci": {
        "reference_to_video": (720, 1280, 1),
        "single_shot_extension": (720, 1280, 1),
        "shot_switching_extension": (720, 1280, 2),
        "talking_avatar": (480, 832, 3.24),
    },
    # the same runs at toy sizes: a check of the harness itself
    "smoke": {
        "reference_to_video": (32, 48, 1),
        "single_shot_extension": (32, 48, 1),
        "shot_switching_extension": (32, 48, 2),
        "talking_avatar": (32, 48, 3.24),
    },
}
#: a narrow Wan VAE (2 channels, no extra residual blocks): the real tiling and causal code, a fraction of the CPU
NARROW_VAE = dict(
    base_dim=2, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=0, temperal_downsample=[False, True, True]
)
INPUT_VIDEO_FRAMES = 33


def write_inputs(folder: Path) -> None:
    """Reference images (720P), a 720P input video, a 480P portrait and 3.24 s of speech-like audio."""
    import PIL.Image

    from skyreels_diffusers.app.tasks import speech_like
    from skyreels_diffusers.pipelines.video_io import write_video

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def smooth(height: int, width: int, frames: int = 1) -> np.ndarray:
        coarse = rng.integers(0, 256, (frames, height // 40 + 2, width // 40 + 2, 3)).astype(np.float32)
        big = torch.nn.functional.interpolate(
            torch.from_numpy(coarse).permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False
        )
        return big.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    for index in range(2):
        PIL.Image.fromarray(smooth(720, 1280)[0]).save(folder / f"ref{index}.png")
    PIL.Image.fromarray(smooth(480, 832)[0]).save(folder / "portrait.png")
    write_video(smooth(720, 1280, INPUT_VIDEO_FRAMES), folder / "input.mp4", fps=24, crf=0)
    samples = (np.clip(speech_like(3.24), -1, 1) * 32767).astype(np.int16)
    with wave.open(str(folder / "speech.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(samples.tobytes())


def request_for(task: str, profile: str, inputs: Path, output: Path, world: int):
    from skyreels_diffusers.app.request import GenerationRequest

    height, width, seconds = PROFILES[profile][task]
    media = {
        "reference_to_video": {"ref_imgs": [str(inputs / "ref0.png"), str(inputs / "ref1.png")]},
        "single_shot_extension": {"input_video": str(inputs / "input.mp4")},
        "shot_switching_extension": {"input_video": str(inputs / "input.mp4")},
        "talking_avatar": {"input_image": str(inputs / "portrait.png"), "input_audio": str(inputs / "speech.wav")},
    }[task]
    parallel = {"ulysses_degree": world, "shard_weights": True} if world > 1 else {}
    return GenerationRequest(
        task=task,
        model="tiny",
        prompt="[ZOOM_IN_CUT] a person walks" if task == "shot_switching_extension" else "a person walks",
        **({} if task == "talking_avatar" else {"duration": int(seconds)}),  # the avatar's: the audio's
        resolution="480P" if height == 480 else "720P",
        height=height,
        width=width,
        steps=1,
        seed=0,
        crf=0,
        output=str(output),
        overwrite=True,
        **media,
        **parallel,
    )


def narrow_pipeline(task: str):
    """The tiny pipeline of `task` (2-layer transformer, tiny encoders) with the narrow VAE."""
    from diffusers import AutoencoderKLWan

    from skyreels_diffusers.app.tiny import tiny_components

    components = tiny_components(task, seed=0)
    torch.manual_seed(3)
    components["vae"] = AutoencoderKLWan(**NARROW_VAE).eval()
    from skyreels_diffusers.app.tasks import TASKS

    pipe = TASKS[task].pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Recorder:
    """Every stage of a run, by name, in order. The one-process run saves each stage as it comes (`folder/NAME.pt`);
    a rank of the parallel run compares each of its stages with that file (memory-mapped) at once and keeps the
    differences only, so that no process holds a whole run's stages (a 5-s 720P video is 1.3 GB of floats)."""

    INPUTS = (
        "hidden_states",
        "timestep",
        "encoder_hidden_states",
        "encoder_hidden_states_image",
        "audio_embeds",
        "condition_hidden_states",
    )

    def __init__(self, pipe, folder: Path, reference: bool):
        self.folder, self.reference = folder, reference
        self.rows: dict[str, dict] = {}
        self.forwards = self.steps = self.clips = 0
        pipe.transformer.register_forward_pre_hook(self._inputs, with_kwargs=True)
        pipe.transformer.register_forward_hook(self._output)
        decode = pipe.decode_latents

        def recorded_decode(latents, *args, **kwargs):  # the decoded clip, before any uint8 rounding
            video = decode(latents, *args, **kwargs)
            self.keep(f"decoded.{self.clips}", video)
            self.clips += 1
            return video

        pipe.decode_latents = recorded_decode

    def keep(self, name: str, value) -> None:
        if not isinstance(value, torch.Tensor):
            return
        value = value.detach().cpu()
        if self.reference:
            torch.save(value.float().clone(), self.folder / f"{name}.pt")
            self.rows[name] = {"shape": list(value.shape)}
            return
        path = self.folder / f"{name}.pt"
        expected = torch.load(path, mmap=True, weights_only=True) if path.is_file() else None
        self.rows[name] = difference(value, expected)

    def _inputs(self, module, args, kwargs):
        for name in self.INPUTS:
            self.keep(f"forward.{self.forwards}.in.{name}", kwargs.get(name))

    def _output(self, module, args, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        self.keep(f"forward.{self.forwards}.out", sample)
        self.forwards += 1

    def step(self, pipe, step: int, timestep, tensors: dict) -> dict:
        self.keep(f"step.{self.steps}.latents", tensors["latents"])
        self.steps += 1
        return {}


def difference(got: torch.Tensor, expected: torch.Tensor | None, chunk: int = 1 << 24) -> dict:
    """Shapes, the largest absolute difference, the mean one and the norm of the difference over the reference's
    (in float64, a chunk at a time)."""
    row = {"shape": list(got.shape)}
    if expected is None or expected.shape != got.shape:
        return {**row, "expected": None if expected is None else list(expected.shape)}
    ours, theirs = got.reshape(-1), expected.reshape(-1)
    largest = total = squared = norm = 0.0
    for start in range(0, ours.numel(), chunk):
        a, b = ours[start : start + chunk].double(), theirs[start : start + chunk].double()
        gap = (a - b).abs()
        largest = max(largest, gap.max().item())
        total += gap.sum().item()
        squared += gap.square().sum().item()
        norm += b.square().sum().item()
    return {
        **row,
        "max_abs": largest,
        "mean_abs": total / max(ours.numel(), 1),
        "relative": (squared / norm) ** 0.5 if norm else squared**0.5,
    }


def read_frames(path: Path) -> torch.Tensor:
    import av

    with av.open(str(path)) as container:
        return torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]))


def main(out_dir: str, inputs: str, task: str, profile: str) -> None:
    from skyreels_diffusers.app.run import run

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    out = Path(out_dir)
    stages = out / f"{task}_single"
    stages.mkdir(parents=True, exist_ok=True)
    video = out / f"{task}_{'single' if world == 1 else 'parallel'}.mp4"
    request = request_for(task, profile, Path(inputs), video, world)
    pipe = narrow_pipeline(task)
    if world == 1:  # the tiles the parallel VAE shares out, on one process
        pipe.vae.enable_tiling()
    recorder = Recorder(pipe, stages, reference=world == 1)
    started = time.process_time()
    run(request, pipe=pipe, callback_on_step_end=recorder.step)
    cpu_s = time.process_time() - started
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():
        dist.barrier()  # rank 0 has written the mp4
    recorder.keep("mp4", read_frames(video))
    name = "single" if world == 1 else f"rank{rank}"
    summary = {"cpu_s": cpu_s, "stages": recorder.rows}
    if world > 1:
        expected = {path.stem for path in stages.glob("*.pt")}
        summary.update(
            missing_here=sorted(expected - set(recorder.rows)), extra_here=sorted(set(recorder.rows) - expected)
        )
        dist.destroy_process_group()
    (out / f"{task}_{name}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:5])
