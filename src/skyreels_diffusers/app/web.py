"""`skyreels-v3 app`: a local web app for the four tasks (Gradio), thin over the same request code as the CLI.

Every form becomes a `GenerationRequest` validated by `request.validate` (the CLI's checks, one implementation);
an error is shown under the input it names. One job runs at a time (Gradio's queue, with its position shown); a job
reports progress from the pipelines' step/window callbacks and can be cancelled between steps. Results are written
atomically under the output folder with unique names and shown in the page with the equivalent CLI command.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
import threading
import time
import uuid
from pathlib import Path

from ..parallel.context_parallel import broadcast_from_main
from .request import GenerationRequest, RequestError, reported
from .run import run
from .tasks import DEFAULT_PROMPT, DEFAULT_SEED, TASKS


TASK_LABELS = {name: spec.label for name, spec in TASKS.items()}
#: the form's inputs that show errors of their own (each named as its request field); the others' errors go to the
#: input listed here, or under the form
FORM_FIELDS = (
    "ref_imgs",
    "input_video",
    "input_image",
    "input_audio",
    "prompt",
    "duration",
    "resolution",
    "seed",
    "steps",
)
FIELD_OF_ARGUMENT = {"height": "resolution", "width": "resolution"}
RESOLUTION_CHOICES = ["default", "480P", "540P", "720P"]


class Cancelled(Exception):
    pass


def _paths(value) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [getattr(v, "name", v) for v in values if v]


def form_defaults(task: str) -> dict:
    """The values a task's tab starts with: the task's defaults (`tasks.TaskDefaults`), as the CLI's."""
    defaults = TASKS[task].defaults
    return {
        "prompt": DEFAULT_PROMPT,
        "resolution": "default",
        "duration": defaults.duration,
        "seed": DEFAULT_SEED,
        "steps": defaults.steps,
    }


def build_request(task: str, form: dict, model: str, output_dir: Path, **server) -> GenerationRequest:
    """The form of one tab -> the CLI's request object (unique output path under `output_dir`); a setting the tab
    does not show (the avatar's duration: its audio's) is left to the task's default."""
    resolution = form.get("resolution")
    seed = int(form.get("seed") or 0)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    has_duration = TASKS[task].defaults.duration is not None
    request = GenerationRequest(
        task=task,
        model=model,
        prompt=form.get("prompt") or "",
        duration=int(form.get("duration") or 0) if has_duration else None,
        resolution=None if resolution in (None, "", "default") else resolution,
        seed=seed,
        steps=int(form.get("steps") or 0),
        ref_imgs=_paths(form.get("ref_imgs")),
        input_video=(_paths(form.get("input_video")) or [None])[0],
        input_image=(_paths(form.get("input_image")) or [None])[0],
        input_audio=(_paths(form.get("input_audio")) or [None])[0],
        output=str(output_dir / task / f"{seed}_{stamp}_{uuid.uuid4().hex[:8]}.mp4"),
        **server,
    )
    return request


#: longest prompt shown whole in the "equivalent command" (a longer one is cut there, with a note)
MAX_SHOWN_PROMPT = 2000


def cli_command(request: GenerationRequest) -> str:
    """The `skyreels-v3 generate` command that reproduces a request (a prompt over `MAX_SHOWN_PROMPT` characters
    is shortened for display, and a note says so)."""
    prompt = request.prompt
    note = ""
    if len(prompt) > MAX_SHOWN_PROMPT:
        prompt = prompt[:MAX_SHOWN_PROMPT]
        note = (
            f"\n# --prompt shortened here to its first {MAX_SHOWN_PROMPT} of {len(request.prompt)} characters; "
            "the job used the whole prompt"
        )
    args = [
        "skyreels-v3",
        "generate",
        "--task",
        request.task,
        "--model",
        request.model,
        "--prompt",
        prompt,
        "--seed",
        str(request.seed),
    ]
    for flag, value in (("--duration", request.duration), ("--steps", request.steps)):
        if value is not None:
            args += [flag, str(value)]
    if request.resolution:
        args += ["--resolution", request.resolution]
    if request.ref_imgs:
        args += ["--ref-imgs", *request.ref_imgs]
    for flag, value in (
        ("--input-video", request.input_video),
        ("--input-image", request.input_image),
        ("--input-audio", request.input_audio),
    ):
        if value:
            args += [flag, value]
    for flag, on in (("--offload", request.offload), ("--low-vram", request.low_vram)):
        if on:
            args.append(flag)
    if request.ulysses_degree > 1:
        args = [
            "torchrun",
            "--nproc_per_node",
            str(request.ulysses_degree),
            "-m",
            "skyreels_diffusers.app.cli",
            *args[1:],
            "--ulysses-degree",
            str(request.ulysses_degree),
        ]
    return " ".join(shlex.quote(a) for a in args + ["--output", request.output]) + note


def upload_folder() -> Path:
    """Where Gradio keeps its copies of uploaded files (`GRADIO_TEMP_DIR`, else <tmp>/gradio)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def scrub_paths(message: str) -> str:
    """A message for the page: every path under the server's temporary folders becomes its file name."""
    for root in {str(upload_folder()), str(Path(tempfile.gettempdir()).resolve()), tempfile.gettempdir()}:
        message = re.sub(re.escape(root) + r"/[^\s'\"`,;)]*", lambda m: Path(m.group(0)).name, message)
    return message


def request_uploads(request: GenerationRequest) -> list[Path]:
    """The request's input files that are Gradio upload copies (never a file outside the upload folder)."""
    root = upload_folder()
    paths = [*request.ref_imgs, request.input_video, request.input_image, request.input_audio]
    uploads = []
    for value in paths:
        if value:
            path = Path(value).resolve()
            if path.is_relative_to(root) and path != root:
                uploads.append(path)
    return uploads


def delete_uploads(paths: list[Path]) -> None:
    """Remove upload copies after a job, and their per-upload folders when left empty (bounded temp space)."""
    root = upload_folder()
    for path in paths:
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != root and parent.is_relative_to(root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def error_field(error: Exception) -> str:
    """Which input of the form shows an error: the request field a `RequestError` names (`--height` under the
    resolution), `general` for any other."""
    argument = getattr(error, "argument", None) if isinstance(error, RequestError) else None
    field = FIELD_OF_ARGUMENT.get(argument, argument)
    return field if field in FORM_FIELDS else "general"


class JobRunner:
    """Runs one request at a time with progress and per-job cancellation (pipelines cached per task).

    Each job belongs to a `job` key (the web session): `cancel(job)` stops that job only, whether it runs or waits
    in the queue; a cancelled job stops at the next step, before decoding (the step callback raises `Cancelled`).
    Under torchrun (`--ulysses-degree N`) rank 0 serves the page and hands each validated request to the other
    ranks, which run the same job sharded (`serve_workers`); the cancel flag is shared at every step."""

    def __init__(self):
        self.pipes: dict[str, object] = {}
        self.lock = threading.Lock()  # one job on the GPU at a time
        self._cancels: dict[str, threading.Event] = {}
        self._guard = threading.Lock()
        self.worker_cancel = threading.Event()  # ranks > 0: set when rank 0 broadcasts a cancel
        self._live: dict[str, tuple[Path, int]] = {}  # job -> (its growing mp4, the size last shown)

    def cancel(self, job: str) -> bool:
        """Cancel `job`'s running or queued job; False when it has none (nothing else is touched)."""
        with self._guard:
            event = self._cancels.get(job)
        if event is not None:
            event.set()
        return event is not None

    def _step_callback(self, steps: int, progress, event: threading.Event):
        def on_step(pipeline, step, timestep, tensors):
            if progress is not None:
                progress((step + 1) / steps, desc=f"step {step + 1}/{steps}")
            if broadcast_from_main(event.is_set()):  # every rank stops before the same next step
                event.set()
                pipeline._interrupt = True
                raise Cancelled("cancelled")  # out of the pipeline now: no further step, no decode
            return {}

        return on_step

    def run_worker(self, request: GenerationRequest) -> None:
        """A rank > 0's share of a job started on rank 0."""
        self.worker_cancel.clear()
        try:
            run(
                request,
                pipe=self.pipeline(request),
                callback_on_step_end=self._step_callback(request.steps, None, self.worker_cancel),
                should_stop=self.worker_cancel.is_set,
            )
        except Cancelled:
            pass

    def pipeline(self, request: GenerationRequest):
        from .run import load_pipeline

        key = request.task
        if key not in self.pipes:
            self.pipes[key] = load_pipeline(request)
        return self.pipes[key]

    def __call__(self, request: GenerationRequest, progress=None, job: str = "default") -> Path:
        from ..pipelines.video_io import partial_path

        with self._guard:
            if job in self._cancels:
                raise ValueError("this session already has a job running or queued; cancel it or wait.")
            event = self._cancels[job] = threading.Event()
        try:
            with self.lock:
                if request.output:  # a long video grows there while it is made (the avatar, window by window)
                    self._live[job] = (partial_path(request.output), -1)
                return self._run(request, progress, event)
        finally:
            with self._guard:
                self._cancels.pop(job, None)
                self._live.pop(job, None)

    def live_video(self, job: str) -> str | None:
        """The growing mp4 of `job`'s running job when it grew since the last call (None otherwise): what the page
        shows while a long video is made, window by window."""
        with self._guard:
            path, shown = self._live.get(job, (None, -1))
            try:
                size = path.stat().st_size if path is not None else -1
            except OSError:
                return None
            if size <= shown or size <= 0:
                return None
            self._live[job] = (path, size)
        return str(path)

    def _run(self, request: GenerationRequest, progress, event: threading.Event) -> Path:
        from .request import validate

        if event.is_set():  # cancelled while queued
            raise Cancelled("cancelled")
        request = validate(request)
        broadcast_from_main(request)  # the other ranks (torchrun) join the job
        pipe = self.pipeline(request)
        on_step = self._step_callback(max(1, request.steps), progress, event)

        def on_window(pipeline, window, total):
            if progress is not None:
                progress(window / max(total, 1), desc=f"window {window}/{total}")

        try:
            result = run(
                request,
                pipe=pipe,
                callback_on_step_end=on_step,
                callback_on_window_end=on_window,
                should_stop=event.is_set,
            )
        except Cancelled:
            raise
        except Exception:
            if event.is_set():  # whatever a cancelled pipeline ran into afterwards, the user asked to stop
                raise Cancelled("cancelled") from None
            raise
        if event.is_set() or result is None:
            raise Cancelled("cancelled")
        return result


def submit_job(
    runner: JobRunner, task: str, form: dict, model: str, output_root: Path, job: str, progress=None, **server
) -> tuple[str | None, str, dict[str, str]]:
    """One press of Generate: (output path or None, the equivalent command, {input name: message}).

    Messages never show the server's temporary paths, and the job's upload copies are deleted afterwards."""
    request = None
    try:
        request = build_request(task, form, model, output_root, **server)
        shown = cli_command(request)
        for value in (*request.ref_imgs, request.input_video, request.input_image, request.input_audio):
            if value and Path(value).resolve() in request_uploads(request):  # the visitor's own file names
                shown = shown.replace(str(value), Path(value).name)
        path = runner(request, progress=progress, job=job)
        return str(path), shown, {}
    except Cancelled:
        return None, "", {"general": "Cancelled."}
    except Exception as error:  # noqa: BLE001 (shown to the visitor without a traceback; logged on the server)
        failure = reported(error)  # raised on purpose: one line, under the input it concerns
        if failure is not None:
            return None, "", {error_field(failure): f"**Error:** {scrub_paths(str(failure))}"}
        import traceback

        traceback.print_exc()
        return None, "", {"general": f"**Error:** {type(error).__name__}: {scrub_paths(str(error))}"}
    finally:
        if request is not None:
            delete_uploads(request_uploads(request))


def build_app(model: str = "tiny", output_dir: str = "result/app", runner: JobRunner | None = None, **server):
    """The Gradio Blocks app (`server`: offload / low_vram / ulysses_degree / device options of `GenerationRequest`)."""
    try:
        import gradio as gr
    except ImportError as error:
        raise ImportError(
            "The web app needs Gradio: pip install 'skyreels-diffusers[app]' (or pip install gradio)."
        ) from error

    output_root = Path(output_dir)
    runner = runner or JobRunner()

    # Gradio's own cache (served results) is swept hourly; upload copies are deleted after each job (submit_job)
    with gr.Blocks(title="SkyReels-V3", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            f"# SkyReels-V3\nModel: `{model}`"
            + (" (tiny RANDOM weights: the video is noise)" if model == "tiny" else "")
        )
        for task, label in TASK_LABELS.items():
            with gr.Tab(label, elem_id=f"tab-{task}"):
                inputs, errors = {}, {}

                def error_box(name):
                    errors[name] = gr.Markdown("", elem_id=f"{task}-error-{name}", elem_classes=["field-error"])

                _media_inputs(gr, task, inputs, error_box)
                _settings_inputs(gr, task, inputs, error_box)
                error_box("general")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id=f"{task}-generate")
                    cancel = gr.Button("Cancel", elem_id=f"{task}-cancel")
                video = gr.Video(label="Result", elem_id=f"{task}-result", interactive=False, height=360)
                if hasattr(TASKS[task].pipeline_class, "windows"):  # made window by window: watch it grow
                    live_video(gr, runner, task)
                download = gr.File(label="Download", elem_id=f"{task}-download", interactive=False)
                command = gr.Code(label="Equivalent command", language="shell", elem_id=f"{task}-command")

                names = list(inputs)
                error_names = list(errors)

                submit = job_handler(gr, runner, task, names, error_names, model, output_root, **server)

                def cancel_job(request=None):
                    runner.cancel(getattr(request, "session_hash", None) or "default")

                # Gradio passes the visitor's session to a leading positional parameter annotated gr.Request (set
                # here as a class: this module's string annotations cannot name the locally imported `gr`)
                cancel_job.__annotations__ = {"request": gr.Request}

                generate.click(
                    submit,
                    [inputs[n] for n in names],
                    [video, download, command, *[errors[n] for n in error_names]],
                    concurrency_limit=1,
                    concurrency_id="gpu",
                    api_name=f"generate_{task}",
                )
                cancel.click(cancel_job, None, None, queue=False)
    demo.queue(default_concurrency_limit=1)
    return demo


#: seconds between two looks at a running job's growing video
LIVE_SECONDS = 5.0


def live_video(gr, runner: JobRunner, task: str):
    """A second player showing the running job's video as it grows (every `LIVE_SECONDS`, when it grew): the
    growing mp4 plays up to its last finished window while the next ones are made."""
    live = gr.Video(
        label="So far (grows window by window while the job runs)",
        elem_id=f"{task}-live",
        interactive=False,
        height=360,
    )

    def look(request=None):
        path = runner.live_video(getattr(request, "session_hash", None) or "default")
        return gr.skip() if path is None else path

    look.__annotations__ = {"request": gr.Request}  # Gradio passes the visitor's session (see cancel_job)
    gr.Timer(LIVE_SECONDS).tick(look, None, live, queue=False, show_progress="hidden")
    return live


def job_handler(
    gr, runner: JobRunner, task: str, names: list[str], error_names: list[str], model, output_root, **server
):
    """The Generate handler of a tab as Gradio calls it: `handler(request, *form values, progress)`.

    Gradio injects its special arguments by position only (it stops reading the signature at `*args`): the session
    into the leading parameter annotated `gr.Request`, and its progress tracker into the positional parameter whose
    default is a `gr.Progress()`. So the handler declares one positional parameter per input and `progress` last
    (`__signature__`), and the tracker reaches the job's step and window callbacks."""
    import inspect

    def submit(request, *values_and_progress):
        *values, progress = values_and_progress
        form = dict(zip(names, values))
        job = getattr(request, "session_hash", None) or "default"
        path, shown, messages = submit_job(runner, task, form, model, output_root, job, progress, **server)
        blank = dict.fromkeys(error_names, "")
        for field_name, message in messages.items():
            blank[field_name if field_name in blank else "general"] = message
        return (path, path, shown, *[blank[n] for n in error_names])

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    submit.__signature__ = inspect.Signature(
        [
            inspect.Parameter("request", positional, annotation=gr.Request),
            *[inspect.Parameter(name, positional) for name in names],
            inspect.Parameter("progress", positional, default=gr.Progress()),
        ]
    )
    submit.__annotations__ = {"request": gr.Request}
    submit.__name__ = f"generate_{task}"
    return submit


def _settings_inputs(gr, task: str, inputs: dict, error_box) -> None:
    """The prompt and the resolution / duration / seed / steps row of a task's tab, each with its error box (the
    task's defaults as starting values; no duration for a task whose length is its audio's)."""
    values = form_defaults(task)
    inputs["prompt"] = gr.Textbox(label="Prompt", value=values["prompt"], lines=2, elem_id=f"{task}-prompt")
    error_box("prompt")
    with gr.Row():
        inputs["resolution"] = gr.Dropdown(
            RESOLUTION_CHOICES, value=values["resolution"], label="Resolution", elem_id=f"{task}-resolution"
        )
        inputs["duration"] = gr.Number(
            value=values["duration"] or 0,
            precision=0,
            label="Duration (s)",
            visible=values["duration"] is not None,
            elem_id=f"{task}-duration",
        )
        inputs["seed"] = gr.Number(value=values["seed"], precision=0, label="Seed", elem_id=f"{task}-seed")
        inputs["steps"] = gr.Number(value=values["steps"], precision=0, label="Steps", elem_id=f"{task}-steps")
    for name in ("resolution", "duration", "seed", "steps"):
        error_box(name)


def _media_inputs(gr, task: str, inputs: dict, error_box) -> None:
    """The upload widgets of a task's tab (its `TaskSpec.inputs`), each with its error box."""
    for name in TASKS[task].inputs:
        MEDIA_WIDGETS[name](gr, task, inputs)
        error_box(name)


def _reference_images_widget(gr, task: str, inputs: dict) -> None:
    inputs["ref_imgs"] = gr.File(
        label="Reference images (1-4)", file_count="multiple", file_types=["image"], elem_id=f"{task}-ref-imgs"
    )
    preview = gr.Gallery(label="Preview", columns=4, height=160, elem_id=f"{task}-preview")
    inputs["ref_imgs"].change(lambda files: _paths(files), inputs["ref_imgs"], preview)


def _video_widget(gr, task: str, inputs: dict) -> None:
    inputs["input_video"] = gr.Video(label="Input video", sources=["upload"], elem_id=f"{task}-input-video")


def _portrait_widget(gr, task: str, inputs: dict) -> None:
    inputs["input_image"] = checked_by_the_request(
        gr.Image(label="Portrait", type="filepath", image_mode=None, elem_id=f"{task}-input-image")
    )


def _speech_widget(gr, task: str, inputs: dict) -> None:
    inputs["input_audio"] = gr.Audio(label="Speech", type="filepath", elem_id=f"{task}-input-audio")
    audio_info = gr.Markdown("", elem_id=f"{task}-audio-info")
    inputs["input_audio"].change(_audio_duration, inputs["input_audio"], audio_info)


#: request field of an input file -> the widget that uploads it
MEDIA_WIDGETS = {
    "ref_imgs": _reference_images_widget,
    "input_video": _video_widget,
    "input_image": _portrait_widget,
    "input_audio": _speech_widget,
}


def checked_by_the_request(image):
    """A `gr.Image(type="filepath", image_mode=None)` whose upload reaches the request's own image checks whatever
    the file holds.

    Gradio's `Image.preprocess` opens the upload with PIL before any handler runs: a decompression bomb (over twice
    PIL's pixel limit), a truncated or an unreadable file raised there, and the visitor saw a bare "Error" (with the
    upload copy left behind). Here the path is handed on instead, so that the request's check names the problem
    under the portrait input (`--input-image: bomb.png has more pixels than the limit ...`) and the copy is deleted.
    With `image_mode=None` Gradio reads only the header and passes the file as uploaded (no decode, no re-save).
    (An instance attribute, not a subclass: Gradio writes a `.pyi` stub next to the module of any component class.)"""
    import PIL.Image

    preprocess = image.preprocess

    def preprocess_or_pass_on(payload):
        try:
            return preprocess(payload)
        except (PIL.Image.DecompressionBombError, PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError):
            if payload is None or getattr(payload, "path", None) is None:
                raise
            return str(payload.path)

    image.preprocess = preprocess_or_pass_on
    return image


def _audio_duration(path) -> str:
    if not path:
        return ""
    try:
        import av

        with av.open(path) as container:
            seconds = float(container.duration or 0) / 1e6
        return f"Duration: {seconds:.2f} s -> {int(-(-seconds * 25 // 1))} frames at 25 fps"
    except Exception:  # shown as text; the real check runs on Generate
        return "Duration: unreadable"


def serve_workers(runner: JobRunner) -> None:
    """Ranks > 0 under torchrun: run every job rank 0 hands over, until it sends None (shutdown)."""
    while True:
        request = broadcast_from_main()
        if request is None:
            return
        try:
            runner.run_worker(request)
        except (ValueError, Cancelled):
            pass  # rank 0 shows the error


def check_port(host: str, port: int, flag: str = "port") -> None:
    """Whether a server can listen on `host`:`port`, before anything is loaded: a port in [1, 65535] that no other
    program holds (a socket is bound and closed). Raises `RequestError` naming `flag` (or `host`)."""
    import errno
    import socket

    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise RequestError(flag, f"must be a port number in [1, 65535], got {port!r}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise RequestError("host", f"{host!r} is not an address of this machine ({error})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a closed port's TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise RequestError(
                    flag, f"{port} is in use on {host} (another server is running?); pick another with --{flag}"
                ) from None
            raise RequestError(flag, f"cannot listen on {host}:{port} ({error.strerror or error})") from None


def launch(
    model: str = "tiny",
    host: str = "127.0.0.1",
    port: int = 7860,
    output_dir: str = "result/app",
    ulysses_degree: int = 1,
    **server,
) -> None:
    """Serve the app; under torchrun with `ulysses_degree` > 1 rank 0 serves and every rank computes."""
    from ..parallel import init_distributed

    rank, world, device = init_distributed()
    if world > 1:
        server.setdefault("device", str(device))
    runner = JobRunner()
    if rank > 0:
        serve_workers(runner)
        return
    demo = build_app(model=model, output_dir=output_dir, runner=runner, ulysses_degree=ulysses_degree, **server)
    try:
        demo.launch(
            server_name=host, server_port=port, show_error=False, allowed_paths=[str(Path(output_dir).resolve())]
        )
    finally:
        if world > 1:
            broadcast_from_main(None)
