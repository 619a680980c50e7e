"""The HTTP API of `skyreels-v3 serve`, in the shape of OpenAI's videos API (FastAPI; no Ray here).

    POST   /v1/videos                 create a job (JSON or multipart): model = the task, prompt, seconds, size
                                      ("WxH"), seed, input_reference files, and the CLI's own options by name
    GET    /v1/videos/{id}            status (queued, in_progress, completed, failed), progress, error
    GET    /v1/videos/{id}/content    the mp4
    DELETE /v1/videos/{id}            cancel (when unfinished) and delete with every file of the job
    GET    /v1/videos                 the caller's jobs (after, limit, order)
    GET    /v1/models                 the served tasks

A request becomes the CLI's `GenerationRequest` and is validated by `request.validate` (the CLI's checks, before
it is queued): a bad input answers 422 with the CLI's message under the API field it concerns. Jobs live in a
`JobStore`; the API only writes them there and calls `wake()` so that the dispatcher (the Ray ingress, or anything
else) hands them to a replica.

Security: with API keys configured every request needs `Authorization: Bearer KEY` (keys compared as SHA-256
digests in constant time) and sees only the jobs made with its key; paths in requests must lie under the allowed
input folders; uploads are size-limited and deleted with their job; error bodies name no server path.
"""

# (no `from __future__ import annotations`: FastAPI reads the route functions' annotations as objects)
import base64
import binascii
import hashlib
import hmac
import os
import re
import shutil
import statistics
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .jobs import JobStore, new_job_id, public_message
from .request import GenerationRequest, output_size, reported, validate
from .tasks import TASKS


#: request fields a client may set, by their API name (the CLI's option names with underscores)
CLIENT_FIELDS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "resolution",
    "window_prompt",
    "prompt_in_every_window",
    "clip_from_reference",
    "output_audio",
    "max_audio_seconds",
    "keep_source_fps",
    "resize_mode",
    "return_input_video",
    "reproduce_original",
    "crf",
)
#: input files: uploaded (multipart), a data: URL, or a path under an allowed input folder
FILE_FIELDS = ("ref_imgs", "input_video", "input_image", "input_audio")
#: OpenAI's `input_reference` -> the input it is, per transformer variant
REFERENCE_INPUT = {"reference": "ref_imgs", "extension": "input_video", "avatar": "input_image"}
#: run options the server sets for every job (deployment options), never a client
SERVER_OPTIONS = (
    "offload",
    "low_vram",
    "group_offload",
    "sequential_offload",
    "quantize",
    "compile",
    "attention_backend",
    "fast",
    "device",
    "transformer",
)
#: CLI flag (in a validation message) -> the API field, where the two differ beyond `-` / `_`
#: OpenAI's `variant` of `GET /v1/videos/{id}/content` that exist here (no thumbnail, no spritesheet)
CONTENT_KINDS = ("video",)
FLAG_FIELDS = {"--duration": "seconds", "--height": "size", "--width": "size", "--task": "model"}
MAX_FILES = 8
MAX_FIELDS = 64
DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?(;[^,]*)?;base64,(.*)", re.DOTALL)
MEDIA_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "video/mp4": ".mp4"}
MEDIA_SUFFIX.update({"audio/wav": ".wav", "audio/x-wav": ".wav", "audio/mpeg": ".mp3", "audio/flac": ".flac"})


@dataclass(frozen=True)
class ServeSettings:
    """What `skyreels-v3 serve` serves and how. `deployments`: task -> "tiny" or a converted pipeline folder;
    `options`: `GenerationRequest` run options for every job (`low_vram`, `fast`, ...); `max_queued`: unfinished
    jobs per task beyond which a new one gets 429."""

    deployments: dict[str, str]
    store: str = "result/serve"
    api_keys: tuple[str, ...] = ()
    input_dirs: tuple[str, ...] = ()
    max_queued: int = 16
    max_upload_mb: float = 512.0
    options: dict = field(default_factory=dict)
    lease_seconds: float = 60.0
    max_attempts: int = 3
    result_ttl_hours: float | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    task_replicas: dict = field(default_factory=dict)  # task -> replicas, over `replicas`
    min_replicas: int | None = None
    max_replicas: int | None = None
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    graceful_shutdown_s: float = 600.0  # a replica being replaced may finish its job for this long

    def __post_init__(self):
        unknown = sorted(set(self.deployments) - set(TASKS))
        if unknown or not self.deployments:
            raise ValueError(f"--task: must be among {sorted(TASKS)}, got {unknown or 'none'}")
        refused = sorted(set(self.options) - set(SERVER_OPTIONS))
        if refused:
            raise ValueError(f"not server options: {refused}")
        if not is_loopback(self.host) and not self.api_keys:
            raise ValueError(
                f"--host {self.host} is reachable beyond this machine: give API keys (--api-key-file or "
                "SKYREELS_API_KEYS) or bind 127.0.0.1"
            )


class ApiError(Exception):
    """An error answer: HTTP status, OpenAI's error fields, extra headers."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_value", **headers):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def owner_of(authorization: str | None, key_digests: tuple[str, ...]) -> str:
    """The job owner for a request: "local" without configured keys; else the digest of the matching Bearer key
    (each comparison constant-time, every key compared), or 401."""
    if not key_digests:
        return "local"
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "missing API key: send `Authorization: Bearer KEY`", code="invalid_api_key")
    digest = key_digest(key.strip())
    matched = False
    for known in key_digests:
        matched |= hmac.compare_digest(digest, known)
    if not matched:
        raise ApiError(401, "invalid API key", code="invalid_api_key")
    return digest[:32]


def invalid_request(error: Exception, renamed: dict[str, str]) -> ApiError:
    """The request layer's validation error -> 422 naming the API field, with the CLI's message (the one place that
    reads the request layer's error: its typed `argument` / `flag`). `renamed`: request field -> the API field the
    client used for it (`input_reference`)."""
    error = reported(error) or error  # a library error raised on purpose: one line, under its argument's flag
    argument, flag = getattr(error, "argument", None), getattr(error, "flag", None)
    param = None
    if argument is not None:
        param = FLAG_FIELDS.get(flag) or renamed.get(argument, argument)
    return ApiError(422, str(error), param=param)


# ------------------------------------------------------------------------------------------------ request body
def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(GenerationRequest)
    types = {}
    for name in (*CLIENT_FIELDS, "duration"):
        args = [a for a in typing.get_args(hints[name]) if a is not type(None)] or [hints[name]]
        types[name] = args[0]
    return types


def _coerce(name: str, value, kind: type, flag: str):
    """A JSON or form value -> the request field's type, with argparse's wording on failure."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ApiError(422, f"{flag}: invalid bool value: {value!r}", param=name)
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise ApiError(422, f"{flag}: invalid int value: {value!r}", param=name)
    if kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ApiError(422, f"{flag}: invalid float value: {value!r}", param=name) from None
    if not isinstance(value, str):
        raise ApiError(422, f"{flag}: must be a string, got {value!r}", param=name)
    return value


def _size(value) -> dict:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(value))
    if not match:
        raise ApiError(422, f"size: must be WIDTHxHEIGHT in pixels (e.g. 480x272), got {value!r}", param="size")
    return {"width": int(match.group(1)), "height": int(match.group(2))}


class RequestReader:
    """A create request's fields and files -> the `GenerationRequest` values of a job (uploads saved into the
    job's upload folder, paths checked against the allowed input folders)."""

    def __init__(self, settings: ServeSettings, store: JobStore):
        self.settings = settings
        self.store = store
        self.input_roots = [Path(p).resolve() for p in settings.input_dirs]
        self.types = _field_types()

    def model(self, fields: dict) -> str:
        model = fields.pop("model", None)
        served = sorted(self.settings.deployments)
        if model is None and len(served) == 1:
            return served[0]
        if model not in self.settings.deployments:
            raise ApiError(422, f"--task: must be one of {served}, got {model!r}", param="model")
        return model

    def values(self, model: str, fields: dict, files: dict, job_id: str) -> tuple[dict, dict]:
        """(request values, {request field: API field used}) for `model`'s job."""
        values, renamed = {}, {}
        if "seconds" in fields:
            values["duration"] = _coerce("seconds", fields.pop("seconds"), int, "--duration")
        if "size" in fields:
            values.update(_size(fields.pop("size")))
        target = REFERENCE_INPUT[TASKS[model].variant]
        given = {
            name: [*_as_list(fields.pop(name, None)), *files.pop(name, [])]
            for name in (*FILE_FIELDS, "input_reference")
        }
        if given["input_reference"]:
            if given[target]:
                raise ApiError(422, f"give either input_reference or {target}, not both", param="input_reference")
            given[target], renamed[target] = given.pop("input_reference"), "input_reference"
        index = 0
        for name in FILE_FIELDS:
            paths = []
            for item in given.get(name) or []:
                paths.append(self._input(item, renamed.get(name, name), job_id, index))
                index += 1
            if name == "ref_imgs" and paths:
                values[name] = paths
            elif len(paths) > 1:
                raise ApiError(422, f"takes one file, got {len(paths)}", param=renamed.get(name, name))
            elif paths:
                values[name] = paths[0]
        for name, value in fields.items():
            if name in SERVER_OPTIONS or name in ("output", "overwrite", "resume_dir", "task"):
                raise ApiError(422, f"{name}: set by the server, not by a request", param=name)
            if name not in CLIENT_FIELDS:
                raise ApiError(422, f"{name}: unknown field", param=name)
            values[name] = _coerce(name, value, self.types[name], f"--{name.replace('_', '-')}")
        if files:
            raise ApiError(422, f"{sorted(files)[0]}: unknown file field", param=sorted(files)[0])
        return values, renamed

    def _input(self, item, param: str, job_id: str, index: int) -> str:
        """One input -> a path on the server: an upload or data: URL saved for the job, or an allowed path."""
        if isinstance(item, dict):  # OpenAI's JSON form: {"image_url": ...} or {"file_id": ...}
            if "image_url" not in item:
                raise ApiError(
                    422, "only image_url (a data: URL) is accepted here; upload files with multipart", param=param
                )
            item = item["image_url"]
        if not isinstance(item, str):  # an upload
            return self._save(job_id, index, item.filename, item.file)
        match = DATA_URL.fullmatch(item.strip())
        if match:
            try:
                data = base64.b64decode(match.group(3), validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(422, "not valid base64 in the data: URL", param=param) from None
            import io

            return self._save(job_id, index, f"input{MEDIA_SUFFIX.get(match.group(1), '')}", io.BytesIO(data))
        if re.match(r"[a-z]+://", item):
            raise ApiError(422, "URLs are not fetched: upload the file (multipart) or send a data: URL", param=param)
        return self._allowed_path(item, param)

    def _save(self, job_id: str, index: int, filename: str | None, stream) -> str:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(filename or "upload").name)[-100:].lstrip(".") or "upload"
        folder = self.store.upload_dir(job_id) / str(index)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / name, "wb") as handle:
            shutil.copyfileobj(stream, handle)
        return str(folder / name)

    def _allowed_path(self, value: str, param: str) -> str:
        if not self.input_roots:
            raise ApiError(
                422, "paths on the server are not accepted here (no input folder); upload the file", param=param
            )
        candidates = [Path(value)] if os.path.isabs(value) else [root / value for root in self.input_roots]
        for candidate in candidates:
            resolved = candidate.resolve()
            if any(resolved.is_relative_to(root) for root in self.input_roots) and resolved.is_file():
                return str(resolved)
        raise ApiError(422, f"{value!r} is not a file under the allowed input folders", param=param)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ------------------------------------------------------------------------------------------------ the API
def video_object(record: dict, ttl_hours: float | None = None, roots: list[Path] = ()) -> dict:
    """A job record as OpenAI's video object (plus `progress_detail`, `attempts` and `seed`); an error message
    names no server path."""
    error = record["error"] and {**record["error"], "message": public_message(record["error"]["message"], roots)}
    expires = None
    if ttl_hours and record["completed_at"]:
        expires = int(record["completed_at"] + ttl_hours * 3600)
    return {
        "id": record["id"],
        "object": "video",
        "model": record["model"],
        "status": record["status"],
        "progress": record["progress"],
        "created_at": record["created_at"],
        "completed_at": record["completed_at"],
        "expires_at": expires,
        "prompt": record.get("prompt"),
        "size": record.get("size"),
        "seconds": record.get("seconds"),
        "remixed_from_video_id": None,
        "error": error,
        "progress_detail": record.get("progress_detail"),
        "attempts": record["attempts"],
        "seed": record.get("seed"),
    }


def retry_after(store: JobStore, model: str) -> int:
    """Seconds worth waiting before trying again: the median run time of the task's recent jobs (30 without)."""
    times = [
        r["completed_at"] - r["created_at"]
        for r in store.jobs()[-200:]
        if r["model"] == model and r["status"] == "completed"
    ]
    return max(1, int(statistics.median(times[-20:]))) if times else 30


class BodyTooLarge(Exception):
    pass


def too_large_error(limit: int) -> ApiError:
    return ApiError(413, f"the request is over the upload limit of {limit / 2**20:g} MiB", code="upload_too_large")


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused (by its Content-Length, or while it streams)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            from fastapi.responses import JSONResponse

            response = JSONResponse(too_large_error(self.limit).body(), status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge()
            return message

        return await self.app(scope, limited, send)


class VideosApi:
    """What the routes do, without FastAPI: jobs go into `store`, `wake()` tells the dispatcher there is work."""

    def __init__(self, settings: ServeSettings, store: JobStore, wake=lambda: None):
        self.settings, self.store, self.wake = settings, store, wake
        self.digests = tuple(key_digest(k) for k in settings.api_keys)
        self.reader = RequestReader(settings, store)
        self.roots = [store.root, *self.reader.input_roots, Path(tempfile.gettempdir()).resolve()]

    def owner(self, headers) -> str:
        return owner_of(headers.get("authorization"), self.digests)

    def view(self, record: dict) -> dict:
        return video_object(record, self.settings.result_ttl_hours, self.roots)

    def owned(self, headers, video_id: str) -> dict:
        owner, record = self.owner(headers), self.store.get(video_id)
        if record is None or record["owner"] != owner:
            raise ApiError(404, f"no video {video_id!r}", param="video_id", code="not_found")
        return record

    async def create(self, request) -> dict:
        """Validate (the CLI's checks) and queue one job; its uploads are removed again if it is refused."""
        from fastapi.concurrency import run_in_threadpool

        owner, store, settings = self.owner(request.headers), self.store, self.settings
        fields, files, form = await _read_body(request)
        job_id = new_job_id()
        try:
            model = self.reader.model(fields)
            if len(store.unfinished(model)) >= settings.max_queued:
                raise _queue_full(store, model)
            values, renamed = self.reader.values(model, fields, files, job_id)
            job = GenerationRequest(task=model, model=settings.deployments[model], **values, **settings.options)
            try:
                checked = await run_in_threadpool(validate, job)
            except ValueError as error:
                raise invalid_request(error, renamed) from None
            record = store.create(job_id, owner, model, values, limit=settings.max_queued, **_shown(checked))
            if record is None:
                raise _queue_full(store, model)
        except BaseException:
            store.delete(job_id)
            shutil.rmtree(store.upload_dir(job_id), ignore_errors=True)
            raise
        finally:
            if form is not None:
                await form.close()
        self.wake()
        return self.view(record)

    def page(self, headers, after: str | None, limit: int, order: str) -> dict:
        """The caller's jobs, OpenAI's list object (newest first by default)."""
        if order not in ("asc", "desc"):
            raise ApiError(422, f"order: must be 'asc' or 'desc', got {order!r}", param="order")
        if not 0 <= limit <= 100:
            raise ApiError(422, f"limit: must be in [0, 100], got {limit}", param="limit")
        owner = self.owner(headers)
        records = [r for r in self.store.jobs() if r["owner"] == owner]
        if order == "desc":
            records.reverse()
        ids = [r["id"] for r in records]
        if after is not None:
            records = records[ids.index(after) + 1 :] if after in ids else []
        page = records[:limit]
        return {
            "object": "list",
            "data": [self.view(r) for r in page],
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(records) > len(page),
        }

    def content(self, headers, video_id: str, content_kind: str) -> Path:
        """The mp4 of a finished job; `content_kind`: OpenAI's `variant` query parameter (only "video" here)."""
        record = self.owned(headers, video_id)
        if content_kind not in CONTENT_KINDS:
            raise ApiError(422, f"variant: only 'video' is available, got {content_kind!r}", param="variant")
        if record["status"] != "completed":
            message = f"the video is {record['status']}; its content exists once completed"
            raise ApiError(409, message, code="not_ready")
        return self.store.result_path(video_id)

    def models(self, headers) -> dict:
        self.owner(headers)
        data = [
            {"id": task, "object": "model", "created": 0, "owned_by": "skyreels-v3"}
            for task in self.settings.deployments
        ]
        return {"object": "list", "data": data}


def _shown(checked: GenerationRequest) -> dict:
    """What the video object shows of a validated request: prompt, size `WxH`, seconds (the audio's for the
    avatar), seed."""
    height, width = output_size(checked)
    speech = checked.media.speech
    seconds = f"{speech.duration:g}" if speech is not None else str(checked.duration)
    return dict(prompt=checked.prompt, size=f"{width}x{height}", seconds=seconds, seed=checked.seed)


def build_api(settings: ServeSettings, store: JobStore, wake=lambda: None):
    """The ASGI app (FastAPI behind the body-size limit): jobs go into `store`, `wake()` tells the dispatcher.

    >>> app = build_api(ServeSettings(deployments={"reference_to_video": "tiny"}), JobStore("jobs"))
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse

    api = VideosApi(settings, store, wake)
    limit = int(settings.max_upload_mb * 2**20)
    app = FastAPI(title="SkyReels-V3", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        body = error.body()
        body["error"]["message"] = public_message(body["error"]["message"], api.roots)
        return JSONResponse(body, status_code=error.status, headers=error.headers or None)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request, error):
        return JSONResponse(too_large_error(limit).body(), status_code=413)

    @app.post("/v1/videos")
    async def create_video(request: Request):
        return await api.create(request)

    @app.get("/v1/videos")
    async def list_videos(request: Request, after: str | None = None, limit: int = 20, order: str = "desc"):
        return api.page(request.headers, after, limit, order)

    @app.get("/v1/videos/{video_id}")
    async def get_video(request: Request, video_id: str):
        return api.view(api.owned(request.headers, video_id))

    @app.get("/v1/videos/{video_id}/content")
    async def get_content(request: Request, video_id: str, variant: str = "video"):
        path = api.content(request.headers, video_id, variant)
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(request: Request, video_id: str):
        api.owned(request.headers, video_id)
        store.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/models")
    async def list_models(request: Request):
        return api.models(request.headers)

    @app.get("/healthz")
    async def health():
        return {"status": "ok", "time": int(time.time())}

    return BodyLimit(app, limit)


def _queue_full(store: JobStore, model: str) -> ApiError:
    wait = retry_after(store, model)
    message = f"the queue of {model} is full; retry in about {wait} s"
    return ApiError(429, message, code="queue_full", **{"Retry-After": str(wait)})


async def _read_body(request) -> tuple[dict, dict, object]:
    """(fields, {name: [uploads]}, the form to close) of a JSON or multipart create request."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS)
        fields, files = {}, {}
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(name, []).append(value)
            else:
                files.setdefault(name, []).append(value)
        return {k: v[0] if len(v) == 1 and k not in FILE_FIELDS else v for k, v in fields.items()}, files, form
    if content_type.startswith("application/json") or not content_type:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(422, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(422, "the body must be a JSON object")
        return body, {}, None
    raise ApiError(
        415, f"send application/json or multipart/form-data, not {content_type!r}", code="unsupported_media"
    )
