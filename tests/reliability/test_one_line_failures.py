"""Every failure raised on purpose is one line, before the model where it can be: device, attention backend and
quantisation choices, a transformer file of the other architecture, damaged files, flags of another task, a
dangling `--output` link, a busy or impossible port; the NaN guard and loader errors during a run under the flag (or
none) in the command line, the web app's error box and the served API's job record."""

from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import save_file

from skyreels_diffusers.app import run as run_module
from skyreels_diffusers.app.cli import main
from skyreels_diffusers.app.request import (
    GenerationRequest,
    RequestError,
    RunFailure,
    reported,
    task_fields,
    validate,
    with_task_defaults,
)
from skyreels_diffusers.app.tasks import TASKS
from skyreels_diffusers.app.tiny import tiny_pipeline
from tests.helpers import random_image
from tests.reliability.fault_cases import _wav


REFERENCE = ["--task", "reference_to_video", "--model", "tiny", "--steps", "1", "--height", "32", "--width", "32"]


def _errors(capsys) -> list[str]:
    """The error lines of stderr (progress bars aside); never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.strip() and "it/s]" not in line]


@pytest.fixture
def no_loading(monkeypatch):
    """A run that reaches the model fails the test: the refusal must come first."""
    monkeypatch.setattr(run_module, "load_pipeline", lambda request: pytest.fail("the model loaded first"))


def _cases() -> list[tuple[list[str], str]]:
    cases = [
        (["--device", "foo"], "error: --device: must be cpu, cuda or cuda:N (a GPU's index), got 'foo'"),
        (["--device", "meta"], "error: --device: must be cpu, cuda or cuda:N"),
        (["--attention-backend", "nonsense"], "error: --attention-backend: unknown attention backend 'nonsense'; "),
    ]
    if not torch.cuda.is_available():
        cases += [
            (["--device", "cuda"], "error: --device: cuda: no CUDA device is available here"),
            (["--device", "cuda:3"], "error: --device: cuda:3: no CUDA device is available here"),
            (
                ["--quantize", "fp8_dynamic", "--device", "cpu"],
                "error: --quantize: fp8_dynamic needs FP8 tensor cores",
            ),
        ]
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        cases.append(
            (["--attention-backend", "flash"], "error: --attention-backend: Flash Attention backend 'flash' ")
        )
    return cases


@pytest.mark.parametrize(
    "flags, message", _cases(), ids=lambda value: " ".join(value) if isinstance(value, list) else ""
)
def test_run_choices_are_refused_before_the_model_loads(flags, message, capsys, no_loading, tmp_path):
    """Before: `--device foo`, `--device cuda` without CUDA, `--attention-backend flash` without flash-attn and
    `--quantize fp8_dynamic` on a CPU failed after the model had loaded, with a traceback (an unknown backend:
    with diffusers' "`backend='nonsense'`")."""
    assert main(["generate", *REFERENCE, *flags, "--output", str(tmp_path / "x.mp4")]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith(message), errors
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- flags of other tasks
def _value_for(name: str, tmp_path):
    image = tmp_path / "face.png"
    if not image.exists():
        random_image(48, 40).save(image)
    values = {"ref_imgs": [str(image)], "duration": 3, "resize_mode": "nearest", "output_audio": "normalized"}
    values.update(max_audio_seconds=20.0, window_prompt="hi", resume_dir=str(tmp_path / "r"))
    default = GenerationRequest.__dataclass_fields__[name].default
    return values.get(name, True if default is False else str(image))


@pytest.mark.parametrize("task", list(TASKS))
def test_every_flag_of_another_task_is_refused_by_name(task, tmp_path):
    """Before: `--resume-dir` outside the avatar, `--input-audio` / `--input-image` with reference-to-video,
    `--ref-imgs` / `--duration` / `--input-video` with the avatar, ... were silently ignored. Which flags belong to
    which task is the registry's (`TaskSpec.inputs` and `options`)."""
    fields = task_fields(TASKS[task])
    assert fields  # every task has flags it does not read
    for name in fields:
        request = GenerationRequest(task=task, model="tiny", **{name: _value_for(name, tmp_path)})
        with pytest.raises(RequestError) as error:
            validate(request)
        assert error.value.argument == name, (name, str(error.value))
        readers = [other for other, spec in TASKS.items() if name in (*spec.inputs, *spec.options)]
        assert (
            str(error.value)
            == f"--{name.replace('_', '-')}: does not apply to {task} (only to {', '.join(readers)}); drop it"
        )
    assert not (tmp_path / "r").exists()


def test_the_registry_declares_every_field_a_task_reads():
    """`call_kwargs` reads no task-specific request field its task does not declare (inputs, options): a new one
    must be added to the registry, or the flag would be refused for the task that reads it."""
    common = None
    read = {}
    for name, spec in TASKS.items():
        request = with_task_defaults(GenerationRequest(task=name, model="tiny"))
        seen = set()

        class Recorder:
            def __getattr__(self, field):
                seen.add(field)
                return getattr(request, field)

        request = type(request)(**{**request.__dict__})
        object.__setattr__(request, "fps", 24)
        object.__setattr__(request, "media", spec.example_inputs())
        spec.call_kwargs(Recorder())
        read[name] = seen - {"spec", "media", "fps"}
        common = read[name] if common is None else common & read[name]
    for name, spec in TASKS.items():
        assert read[name] - common <= set(spec.inputs) | set(spec.options), name


# ---------------------------------------------------------------------------------------------- files and folders
@pytest.fixture
def avatar_folder(tmp_path):
    pipe = tiny_pipeline("talking_avatar")
    pipe.save_pretrained(tmp_path / "avatar")
    image = tmp_path / "face.png"
    random_image(48, 40).save(image)
    base = [
        "--task", "talking_avatar", "--model", str(tmp_path / "avatar"), "--input-image", str(image),
        "--input-audio", str(_wav(tmp_path / "speech.wav", 1.0)), "--steps", "1", "--height", "32", "--width", "32",
        "--device", "cpu", "--output", str(tmp_path / "out" / "x.mp4"),
    ]  # fmt: skip
    return tmp_path, base


def test_a_transformer_of_the_other_architecture_is_named_before_loading(avatar_folder, capsys, no_loading):
    """Before: `KeyError: "Checkpoint ... does not match the 'avatar' model: missing keys [...]"`, a traceback after
    the folder had loaded."""
    from tests.conversion.community_files import wan_native_state

    root, base = avatar_folder
    video = tiny_pipeline("single_shot_extension").transformer
    save_file({k: v.contiguous() for k, v in wan_native_state(video).items()}, str(root / "video.safetensors"))
    assert main(["generate", *base, "--transformer", str(root / "video.safetensors")]) == 2
    errors = _errors(capsys)
    assert errors == [
        f"error: --transformer: {root / 'video.safetensors'} holds a video transformer (reference-to-video / "
        "extension: no audio layers); this pipeline needs a talking-avatar transformer (with audio layers) (a "
        "transformer file of another task)"
    ]
    cut = root / "cut.safetensors"
    cut.write_bytes((root / "video.safetensors").read_bytes()[:3000])
    assert main(["generate", *base, "--transformer", str(cut)]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith(f"error: --transformer: {cut} is truncated"), errors


def test_loader_errors_during_the_load_are_one_line_under_their_flag(avatar_folder, capsys):
    """A damaged file found only while loading (a GGUF file the header check does not read; a folder weight) is
    reported under the flag that names it. Before: `error: model folder ...` (no flag) and raw loader exceptions."""
    root, base = avatar_folder
    (root / "bad.gguf").write_bytes(b"GGUF" + bytes(300))
    assert main(["generate", *base, "--transformer", str(root / "bad.gguf")]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith(f"error: --transformer: {root / 'bad.gguf'} is not a readable"), (
        errors
    )
    weights = root / "avatar" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert main(["generate", *base]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith("error: --model: model folder "), errors


def test_a_dangling_output_link_is_refused_early_with_its_reason(tmp_path, capsys, no_loading):
    """Before: it passed the early check, the run went through, and the write failed with "it appeared during the
    run" (the frames kept in a temporary file)."""
    link = tmp_path / "out.mp4"
    link.symlink_to(tmp_path / "gone" / "target.mp4")
    for extra in ([], ["--overwrite"]):
        assert main(["generate", *REFERENCE, "--output", str(link), *extra]) == 2
        assert _errors(capsys) == [
            f"error: --output: {link} is a symbolic link to {tmp_path / 'gone' / 'target.mp4'}, which does not "
            "exist; remove the link or pick another name"
        ]


def test_a_converted_folder_without_its_index_is_named_as_such(avatar_folder, capsys, no_loading):
    """Before: its `vae/` subfolder made it read as a ComfyUI models folder, and the command line asked for
    `--text-encoder FILE (no file of its layout in ...)` and more."""
    root, base = avatar_folder
    (root / "avatar" / "model_index.json").unlink()
    assert main(["generate", *base]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1, errors
    assert errors[0].startswith(
        f"error: --model: model folder {root / 'avatar'}: the folder (model_index.json): missing, but the folder "
        "holds a saved pipeline's components (audio_encoder/, feature_extractor/, image_encoder/, ... 8 subfolders)"
    ), errors
    assert "--text-encoder" not in errors[0]


# ---------------------------------------------------------------------------------------------- during the run
@pytest.fixture
def diverging(monkeypatch):
    """`--model tiny` whose transformer outputs NaN (the NaN guard's case)."""

    def nan_pipeline(task, seed=0):
        pipe = tiny_pipeline(task, seed=seed)
        with torch.no_grad():
            for parameter in pipe.transformer.parameters():
                parameter.fill_(float("nan"))
        return pipe

    monkeypatch.setattr(run_module, "tiny_pipeline", nan_pipeline)


def test_the_nan_guard_is_one_line_with_exit_code_1(diverging, capsys, tmp_path):
    """Before: `FloatingPointError: ...` with a traceback (the CLI caught only ValueError)."""
    assert main(["generate", *REFERENCE, "--output", str(tmp_path / "x.mp4")]) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith("error: The latents hold NaN or infinite values"), errors
    assert not (tmp_path / "x.mp4").exists()


def test_the_web_app_and_the_job_worker_show_the_same_line(diverging, tmp_path):
    """The web app shows it in the general error box (before: "FloatingPointError: ..." and a server traceback);
    a served job fails with code generation_failed and the same line."""
    from skyreels_diffusers.app.jobs import JobStore, JobWorker
    from skyreels_diffusers.app.web import JobRunner, submit_job

    image = tmp_path / "ref.png"
    random_image(48, 40).save(image)
    form = {"prompt": "a cat", "resolution": "default", "duration": 1, "seed": 7, "steps": 1, "ref_imgs": [str(image)]}
    path, _, messages = submit_job(JobRunner(), "reference_to_video", form, "tiny", tmp_path / "web", "S")
    assert path is None and list(messages) == ["general"]
    assert messages["general"].startswith("**Error:** The latents hold NaN or infinite values"), messages
    store = JobStore(tmp_path / "store")
    job = "video_" + "0" * 32
    store.create(job, "local", "reference_to_video", {"duration": 1, "steps": 1, "height": 32, "width": 32}, limit=4)
    assert JobWorker("reference_to_video", store, model="tiny").run_job(job) == "failed"
    error = store.get(job)["error"]
    assert error["code"] == "generation_failed" and error["message"].startswith("The latents hold NaN"), error


def test_errors_raised_on_purpose_map_to_one_line():
    assert str(reported(FloatingPointError("The latents hold NaN.\nnothing was decoded"))) == (
        "The latents hold NaN. nothing was decoded"
    )
    assert isinstance(reported(FloatingPointError("x")), RunFailure)
    assert str(reported(ValueError("`audio`: 0.2 s of audio"))) == "--input-audio: 0.2 s of audio"
    assert str(reported(ValueError("plain"))) == "plain" and reported(ValueError("plain")).flag is None
    assert reported(KeyError("a bug")) is None and reported(TypeError("a bug")) is None


# ---------------------------------------------------------------------------------------------- ports
def test_an_impossible_or_busy_port_is_one_line(capsys, monkeypatch):
    """Before: nothing checked the port: the app was built (and `serve` started Ray) before the server's own error
    came, as a traceback."""
    from skyreels_diffusers.app import serve as serve_module
    from skyreels_diffusers.app import web

    monkeypatch.setattr(web, "launch", lambda **kwargs: pytest.fail("launched"))
    assert main(["app", "--port", "70000"]) == 2
    assert _errors(capsys) == ["error: --port: must be a port number in [1, 65535], got 70000"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["app", "--port", str(port)]) == 2
        assert _errors(capsys) == [
            f"error: --port: {port} is in use on 127.0.0.1 (another server is running?); pick another with --port"
        ]
        monkeypatch.setattr(serve_module, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
        assert main(["serve", "--port", str(port), "--store", "/tmp/never-made-store"]) == 2
        errors = _errors(capsys)
        assert errors == [
            f"error: --port: {port} is in use on 127.0.0.1 (another server is running?); pick another with --port"
        ]
