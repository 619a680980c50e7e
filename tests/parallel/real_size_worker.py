"""Worker of the real-size whole-run tests: whole runs through `app.run.run` (what `skyreels-v3 generate` does;
under torchrun: the text/audio encoders once on rank 0, Ulysses over every rank, the parallel VAE and
`--shard-weights`) at the real shapes of a run (720P reference, extension and shot switching, the avatar's 480P
81-frame windows: their token counts per frame, reference and condition frames, bucket sizes and VAE tile grids)
with narrow components (the tiny transformer, a 2-channel Wan VAE) in float32 on CPU. One invocation runs several
tasks in turn (imports and the rendezvous once):

    python -m tests.parallel.real_size_worker OUT INPUTS PROFILE [TASK ...]                      # OUT/TASK_single.*
    torchrun --nproc_per_node 2 -m tests.parallel.real_size_worker OUT INPUTS PROFILE [TASK ...]  # OUT/TASK_rank0.json

(no TASK: every task of the profile). The one-process run writes its tasks' inputs into INPUTS first. A rank of
the torchrun run waits for the one-process run's `OUT/TASK_single.json` before it starts TASK, so both can be
started at once (`tests/parallel/test_real_size_whole_run.py` starts the torchrun run while the one-process run of
the avatar still goes on).

Profiles (`PROFILES`; the test reads `REAL_SIZE_PROFILE`, default "ci"):

* "ci": every real spatial shape (3,600 tokens per 720P latent frame, 1,560 per 480P one), the 2 reference images
  (4 reference latent frames), the extension's 25 and the shot switching's 9 condition frames, the buckets and VAE
  tile grids (28 at 720P, 15 at 480P), the avatar's two 81-frame clips (the keyframe clip and the window that ends
  on its frames), but as few generated frames as each task allows: 5 reference frames (2 latent frames; the request
  asks for whole seconds), the extensions' input at 4 fps with `--keep-source-fps` (one latent frame a second: 1
  new latent frame after the 7 condition ones, 3 after the shot's 3), and a 1-block transformer.
* "full": what the test ran before "ci": 1-s reference (25 frames) and extension, 2-s shot switching at 24 fps,
  2 blocks (39,600 and 57,600 tokens).
* "long": the 5-s 720P runs of `docs/parallel.md` (126,000 and 144,000 tokens).
* "smoke": the "ci" runs at toy sizes (a check of the harness itself).

Every stage is recorded: each transformer call's inputs (noise and condition latents, timesteps, text / image /
audio embeddings) and output, the latents after every step, every decoded clip (floats, before uint8) and the
written mp4's frames. The one-process run (VAE tiled with the same tiles as the parallel VAE) saves them whole;
each rank of the parallel run compares its own with them and writes, per stage, the largest absolute and the
relative difference (`difference`); rank 0 compares the mp4 it wrote with the one-process run's.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shape:
    """One task's run: the output size, the duration (the avatar's: its audio's length), the input video's frame
    rate (with `--keep-source-fps` the extensions count their duration in it: at 4 fps one latent frame a second)
    and, for the reference, the frames generated (the request asks for whole seconds at 24 fps: 25 frames at least;
    None: `24 * seconds + 1`)."""

    height: int
    width: int
    seconds: float
    input_fps: int = 24
    frames: int | None = None


@dataclass(frozen=True)
class Profile:
    shapes: dict[str, Shape]
    layers: int  # transformer blocks (the tiny transformer's 2 heads of 16: Ulysses 2 gives each rank one)


PROFILES = {
    # the 5-s runs of `bench/bench_e2e.py` (`docs/parallel.md`): 126,000 and 144,000 tokens per forward
    "long": Profile(
        {
            "reference_to_video": Shape(720, 1280, 5),
            "shot_switching_extension": Shape(720, 1280, 2),
            "single_shot_extension": Shape(720, 1280, 5),
            "talking_avatar": Shape(480, 832, 3.24),
        },
        layers=2,
    ),
    # the runs the test made before "ci": 1-s reference and extension at 24 fps, a 2-layer transformer
    "full": Profile(
        {
            "reference_to_video": Shape(720, 1280, 1),  # 25 frames: 7 + 4 latent frames, 39,600 tokens
            "shot_switching_extension": Shape(720, 1280, 2),  # 3 + 13 latent frames, 57,600 tokens
            "single_shot_extension": Shape(720, 1280, 1),  # 7 + 9 latent frames, 57,600 tokens
            "talking_avatar": Shape(480, 832, 3.24),  # 81 frames: the keyframe clip and one window
        },
        layers=2,
    ),
    # every real spatial shape and condition, as few generated frames as each task allows, one block
    "ci": Profile(
        {
            "reference_to_video": Shape(720, 1280, 1, frames=5),  # 2 + 4 latent frames, 21,600 tokens
            "shot_switching_extension": Shape(720, 1280, 2, input_fps=4),  # 3 + 3 latent frames, 21,600 tokens
            "single_shot_extension": Shape(720, 1280, 1, input_fps=4),  # 7 + 1 latent frames, 28,800 tokens
            "talking_avatar": Shape(480, 832, 3.28),  # the keyframe clip and two windows (motion frames handed over)
        },
        layers=1,
    ),
    # the "ci" runs at toy sizes: a check of the harness itself
    "smoke": Profile(
        {
            "reference_to_video": Shape(32, 48, 1, frames=5),
            "shot_switching_extension": Shape(32, 48, 2, input_fps=4),
            "single_shot_extension": Shape(32, 48, 1, input_fps=4),
            "talking_avatar": Shape(32, 48, 3.28),
        },
        layers=1,
    ),
}
PROFILE_ENV = "REAL_SIZE_PROFILE"
#: a narrow Wan VAE (2 channels, no extra residual blocks): the real tiling and causal code, a fraction of the CPU
NARROW_VAE = dict(
    base_dim=2, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=0, temperal_downsample=[False, True, True]
)
INPUT_VIDEO_FRAMES = 25  # the extension's condition frames (the shot switching's 2 s take the last 9)


def write_inputs(folder: Path, profile: str, tasks: list[str]) -> None:
    """The inputs of `tasks`: reference images (720P), the 720P input video at each frame rate the profile reads, a
    480P portrait and the avatar's speech-like audio (drawn in one order whatever the tasks)."""
    import PIL.Image

    from skyreels_diffusers.app.tasks import speech_like
    from skyreels_diffusers.pipelines.video_io import write_video

    folder.mkdir(parents=True, exist_ok=True)
    shapes = PROFILES[profile].shapes
    rng = np.random.default_rng(0)

    def smooth(height: int, width: int, frames: int = 1) -> np.ndarray:
        coarse = rng.integers(0, 256, (frames, height // 40 + 2, width // 40 + 2, 3)).astype(np.float32)
        big = torch.nn.functional.interpolate(
            torch.from_numpy(coarse).permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False
        )
        return big.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    images = {"ref0.png": smooth(720, 1280)[0], "ref1.png": smooth(720, 1280)[0], "portrait.png": smooth(480, 832)[0]}
    for name in ("ref0.png", "ref1.png") if "reference_to_video" in tasks else ():
        PIL.Image.fromarray(images[name]).save(folder / name)
    rates = sorted({shapes[task].input_fps for task in tasks if task.endswith("extension")})
    video = smooth(720, 1280, INPUT_VIDEO_FRAMES) if rates else None
    for fps in rates:
        write_video(video, folder / f"input{fps}.mp4", fps=fps, crf=0)
    if "talking_avatar" in tasks:
        PIL.Image.fromarray(images["portrait.png"]).save(folder / "portrait.png")
        samples = (np.clip(speech_like(shapes["talking_avatar"].seconds), -1, 1) * 32767).astype(np.int16)
        with wave.open(str(folder / "speech.wav"), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(16000)
            out.writeframes(samples.tobytes())


def request_for(task: str, shape: Shape, inputs: Path, output: Path, world: int):
    from skyreels_diffusers.app.request import GenerationRequest

    video = {"input_video": str(inputs / f"input{shape.input_fps}.mp4"), "keep_source_fps": shape.input_fps != 24}
    media = {
        "reference_to_video": {"ref_imgs": [str(inputs / "ref0.png"), str(inputs / "ref1.png")]},
        "single_shot_extension": video,
        "shot_switching_extension": video,
        "talking_avatar": {"input_image": str(inputs / "portrait.png"), "input_audio": str(inputs / "speech.wav")},
    }[task]
    parallel = {"ulysses_degree": world, "shard_weights": True} if world > 1 else {}
    return GenerationRequest(
        task=task,
        model="tiny",
        prompt="[ZOOM_IN_CUT] a person walks" if task == "shot_switching_extension" else "a person walks",
        **({} if task == "talking_avatar" else {"duration": int(shape.seconds)}),  # the avatar's: the audio's
        resolution="480P" if shape.height == 480 else "720P",
        height=shape.height,
        width=shape.width,
        steps=1,
        seed=0,
        crf=0,
        output=str(output),
        overwrite=True,
        **media,
        **parallel,
    )


def narrow_pipeline(task: str, layers: int, frames: int | None = None):
    """The tiny pipeline of `task` (tiny encoders) with a `layers`-block tiny transformer and the narrow VAE;
    `frames`: the reference's frame count, whatever the request's duration."""
    from diffusers import AutoencoderKLWan

    from skyreels_diffusers.app.tasks import TASKS
    from skyreels_diffusers.app.tiny import tiny_components
    from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
    from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS

    components = tiny_components(task, seed=0)
    torch.manual_seed(0)
    config = {**TINY_TRANSFORMER_CONFIGS[TASKS[task].variant], "num_layers": layers}
    components["transformer"] = SkyReelsV3Transformer3DModel(**config).eval()
    torch.manual_seed(3)
    components["vae"] = AutoencoderKLWan(**NARROW_VAE).eval()
    pipeline_class = TASKS[task].pipeline_class
    if frames is not None:
        pipeline_class = with_frames(pipeline_class, frames)
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_frames(pipeline_class: type, frames: int) -> type:
    """`pipeline_class` generating `frames` frames whatever its caller asks (the request layer asks for whole
    seconds)."""

    def __call__(self, **kwargs):
        return pipeline_class.__call__(self, **{**kwargs, "num_frames": frames})

    return type(pipeline_class.__name__, (pipeline_class,), {"__call__": __call__})


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
            whole = value.untyped_storage().nbytes() == value.numel() * value.element_size()
            torch.save((value if whole else value.clone()).float(), self.folder / f"{name}.pt")  # a view: its own
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
    if torch.equal(got.float(), expected):  # as the one-process run saved it (`Recorder.keep`)
        return {**row, "max_abs": 0.0, "mean_abs": 0.0, "relative": 0.0}
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


def compare_videos(got: Path, expected: Path) -> dict:
    """`difference` of two mp4s' frames (uint8 levels); files of the same bytes are not decoded."""
    if got.read_bytes() != expected.read_bytes():
        return difference(read_frames(got), read_frames(expected).float())
    import av

    with av.open(str(got)) as container:
        stream = container.streams.video[0]
        shape = [stream.frames, stream.codec_context.height, stream.codec_context.width, 3]
    return {"shape": shape, "max_abs": 0.0, "mean_abs": 0.0, "relative": 0.0, "same_file": True}


def run_task(task: str, profile: str, out: Path, inputs: Path, world: int) -> None:
    """One task's whole run, recorded: `OUT/TASK_single.json` and the stages (one process) or `OUT/TASK_rankR.json`
    with the differences from the one-process run's stages (each rank of a parallel run)."""
    from skyreels_diffusers.app.run import run

    stages = out / f"{task}_single"
    stages.mkdir(parents=True, exist_ok=True)
    video = out / f"{task}_{'single' if world == 1 else 'parallel'}.mp4"
    shape = PROFILES[profile].shapes[task]
    request = request_for(task, shape, inputs, video, world)
    pipe = narrow_pipeline(task, PROFILES[profile].layers, shape.frames)
    if world == 1:  # the tiles the parallel VAE shares out, on one process
        pipe.vae.enable_tiling()
    recorder = Recorder(pipe, stages, reference=world == 1)
    started = resource.getrusage(resource.RUSAGE_SELF)
    run(request, pipe=pipe, callback_on_step_end=recorder.step)
    ended = resource.getrusage(resource.RUSAGE_SELF)
    rank = dist.get_rank() if dist.is_initialized() else 0
    summary = {
        "cpu_s": {key: getattr(ended, key) - getattr(started, key) for key in ("ru_utime", "ru_stime", "ru_minflt")},
        "stages": recorder.rows,
    }
    if world > 1:
        expected = {path.stem for path in stages.glob("*.pt")}
        summary.update(
            missing_here=sorted(expected - set(recorder.rows)), extra_here=sorted(set(recorder.rows) - expected)
        )
        if rank == 0:  # the mp4 it wrote (one file: the other ranks would read the same frames)
            recorder.rows["mp4"] = compare_videos(video, out / f"{task}_single.mp4")
    name = "single" if world == 1 else f"rank{rank}"
    partial = out / f".{task}_{name}.json"
    partial.write_text(json.dumps(summary, indent=1))
    partial.rename(out / f"{task}_{name}.json")  # complete when it appears (the other ranks wait for it)


def wait_for(path: Path, timeout_s: float = 1800) -> None:
    """Until the one-process run has written `path` (its summary: its stages are all saved)."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} after {timeout_s} s: did the one-process run fail?")
        time.sleep(0.5)


def main(out_dir: str, inputs: str, profile: str, *tasks: str) -> None:
    from skyreels_diffusers.parallel import init_distributed

    torch.set_num_threads(1)
    out, inputs = Path(out_dir), Path(inputs)
    tasks = list(tasks or PROFILES[profile].shapes)
    _, world, _ = init_distributed()  # the rendezvous, once for every task
    if world == 1:
        write_inputs(inputs, profile, tasks)
    for task in tasks:
        if world > 1:
            wait_for(out / f"{task}_single.json")
        run_task(task, profile, out, inputs, world)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
