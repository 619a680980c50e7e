"""The job store and the job worker of `skyreels-v3 serve` (no Ray, no HTTP: both work in one process too).

`JobStore` keeps every job on disk (a folder that several machines may share): one JSON record per job, its
uploads, its result and, for the talking avatar, its resume folder. Records are written atomically (a hidden file
renamed into place) and changed under one lock file (`fcntl.flock`), so any process that sees the folder can read
or update them. A replica owns the job it runs through a lease that it renews; a job whose lease lapses (the
replica or its machine died) is claimed again by another replica, and only the holder of the current lease may
finish it, so a job completes once.

`JobWorker` runs one task's jobs on one pipeline (the web app's `JobRunner`: pipelines cached, progress from the
step/window callbacks, cancellation between steps) and writes progress, heartbeats and the outcome to the store.

    store = JobStore("jobs")
    job = store.create("video_...", owner="local", model="reference_to_video", request={"seed": 1}, limit=8)
    JobWorker("reference_to_video", store, model="tiny").run_job(job["id"])
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path

from .request import GenerationRequest, RunFailure, reported
from .tasks import TASKS
from .web import Cancelled, JobRunner


UNFINISHED = ("queued", "in_progress")
JOB_ID = re.compile(r"video_[0-9a-f]{32}")
#: events kept per job record (the newest)
MAX_HISTORY = 200


def public_message(message: str, roots: list[Path] = ()) -> str:
    """A message fit for a client: paths under the server's folders become their file names, and so does any
    other absolute path."""
    for root in sorted({str(r) for r in roots}, key=len, reverse=True):
        message = re.sub(re.escape(root.rstrip("/")) + r"/[^\s'\"`,;)]*", lambda m: Path(m.group(0)).name, message)
    return re.sub(r"(?<![\w.])/(?:[\w.+-]+/)+[\w.+-]*", lambda m: Path(m.group(0)).name, message)


def new_job_id() -> str:
    return f"video_{secrets.token_hex(16)}"


class JobStore:
    """Jobs as files under `root`: `jobs/<id>.json`, `unfinished/<id>`, `uploads/<id>/`, `work/<id>/`,
    `resume/<id>/`, `results/<id>.mp4`. `lease_seconds`: how long a claim lives without a heartbeat;
    `max_attempts`: runs of a job whose replica keeps dying before it is failed."""

    def __init__(self, root: str | os.PathLike, lease_seconds: float = 60.0, max_attempts: int = 3):
        self.root = Path(root).resolve()
        self.lease_seconds = float(lease_seconds)
        self.max_attempts = int(max_attempts)
        for folder in ("jobs", "unfinished", "uploads", "work", "resume", "results"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------------------ paths
    def _checked(self, job_id: str) -> str:
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise KeyError(job_id)
        return job_id

    def record_path(self, job_id: str) -> Path:
        return self.root / "jobs" / f"{self._checked(job_id)}.json"

    def marker_path(self, job_id: str) -> Path:
        """`unfinished/<id>`: an empty file while the job is queued or running (what the dispatcher and the queue
        bound read, without opening every finished record)."""
        return self.root / "unfinished" / self._checked(job_id)

    def upload_dir(self, job_id: str) -> Path:
        return self.root / "uploads" / self._checked(job_id)

    def work_dir(self, job_id: str) -> Path:
        return self.root / "work" / self._checked(job_id)

    def resume_dir(self, job_id: str) -> Path:
        return self.root / "resume" / self._checked(job_id)

    def result_path(self, job_id: str) -> Path:
        return self.root / "results" / f"{self._checked(job_id)}.mp4"

    # ------------------------------------------------------------------------------------------------ records
    @contextlib.contextmanager
    def locked(self):
        """The store-wide lock of every read-modify-write (POSIX advisory lock: local disks and NFS alike)."""
        with open(self.root / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, record: dict) -> None:
        path = self.record_path(record["id"])
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        with open(tmp, "w") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def get(self, job_id: str) -> dict | None:
        try:
            return json.loads(self.record_path(job_id).read_text())
        except (KeyError, FileNotFoundError, json.JSONDecodeError):
            return None

    def jobs(self) -> list[dict]:
        """Every record, oldest first."""
        records = []
        for path in (self.root / "jobs").glob("video_*.json"):
            record = self.get(path.stem)
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: (r["created_at"], r["id"]))

    def unfinished(self, model: str | None = None) -> list[dict]:
        """The queued and running jobs (of `model`), oldest first."""
        records = []
        for path in (self.root / "unfinished").iterdir():
            record = self.get(path.name)
            if record is not None and record["status"] in UNFINISHED and model in (None, record["model"]):
                records.append(record)
        return sorted(records, key=lambda r: (r["created_at"], r["id"]))

    @staticmethod
    def _event(record: dict, event: str, **details) -> None:
        record["history"] = [*record.get("history", []), {"event": event, "t": time.time(), **details}][-MAX_HISTORY:]

    def create(self, job_id: str, owner: str, model: str, request: dict, limit: int, **view) -> dict | None:
        """A queued job; None when `model` already has `limit` unfinished jobs (the queue is full)."""
        with self.locked():
            if len(self.unfinished(model)) >= limit:
                return None
            record = {
                "id": job_id,
                "owner": owner,
                "model": model,
                "request": request,
                "status": "queued",
                "progress": 0,
                "progress_detail": None,
                "created_at": int(time.time()),
                "completed_at": None,
                "error": None,
                "attempts": 0,
                "lease": None,
                **view,
            }
            self._event(record, "created")
            self.marker_path(job_id).touch()
            self._write(record)
            return record

    def update(self, job_id: str, change) -> dict | None:
        """Apply `change(record)` (which may return False to leave the record as it was) under the lock."""
        with self.locked():
            record = self.get(job_id)
            if record is None or change(record) is False:
                return None
            self._write(record)
            return record

    # ------------------------------------------------------------------------------------------------ leases
    def is_stale(self, record: dict, now: float | None = None) -> bool:
        lease = record.get("lease")
        return lease is None or (now or time.time()) - lease["heartbeat"] > self.lease_seconds

    def dispatchable(self) -> list[dict]:
        """Jobs that need a replica: queued ones, and running ones whose lease lapsed."""
        now = time.time()
        return [
            r
            for r in self.unfinished()
            if r["status"] == "queued" or (r["status"] == "in_progress" and self.is_stale(r, now))
        ]

    def claim(self, job_id: str, holder: dict) -> dict | None:
        """Take the job for a run (queued, or running under a lapsed lease); None when it is not to be run here.
        A job whose replicas died `max_attempts` times is failed instead."""

        def take(record):
            if record["status"] not in UNFINISHED:
                return False
            if record["status"] == "in_progress" and not self.is_stale(record):
                return False
            if record["attempts"] >= self.max_attempts:
                record.update(status="failed", lease=None, completed_at=int(time.time()))
                record["error"] = {
                    "code": "replica_lost",
                    "message": f"the replica running this job stopped {record['attempts']} times",
                }
                self._event(record, "failed", reason="replica_lost")
                self.marker_path(job_id).unlink(missing_ok=True)
                return None
            record["attempts"] += 1
            record["status"] = "in_progress"
            record["lease"] = {**holder, "token": secrets.token_hex(8), "heartbeat": time.time()}
            self._event(record, "claimed", attempt=record["attempts"], pid=holder.get("pid"))
            return True

        record = self.update(job_id, take)
        if record is not None and record["status"] == "failed":
            self._cleanup(job_id, keep_result=False)
            return None
        return record

    def _holds(self, record: dict, token: str) -> bool:
        lease = record.get("lease")
        return record["status"] == "in_progress" and lease is not None and lease["token"] == token

    def heartbeat(self, job_id: str, token: str, progress: int | None = None, detail: dict | None = None, **event):
        """Renew the lease (and record progress, and an event when given); False when the job is no longer this
        run's (deleted or claimed by another replica)."""

        def beat(record):
            if not self._holds(record, token):
                return False
            record["lease"]["heartbeat"] = time.time()
            if progress is not None:
                record["progress"] = max(0, min(99, int(progress)))
                record["progress_detail"] = detail
            if event:
                self._event(record, **event)

        return self.update(job_id, beat) is not None

    def expire(self, job_id: str, token: str, reason: str) -> bool:
        """Give up the lease `token` now (its replica is known to be gone): the job is queued again."""

        def requeue(record):
            if not self._holds(record, token):
                return False
            record.update(status="queued", lease=None)
            self._event(record, "requeued", reason=reason)

        return self.update(job_id, requeue) is not None

    def complete(self, job_id: str, token: str, output: Path) -> bool:
        """Publish the run's mp4 as the job's result, if this run still holds the job (else the file is dropped)."""

        def finish(record):
            if not self._holds(record, token):
                return False
            os.replace(output, self.result_path(job_id))
            self.marker_path(job_id).unlink(missing_ok=True)
            record.update(status="completed", progress=100, lease=None, completed_at=int(time.time()))
            self._event(record, "completed", attempt=record["attempts"])

        done = self.update(job_id, finish) is not None
        if done:
            self._cleanup(job_id, keep_result=True)
        else:  # superseded or deleted: this run's file only (the job's own files may serve another run)
            Path(output).unlink(missing_ok=True)
            self.forget_if_deleted(job_id)
        return done

    def fail(self, job_id: str, token: str, code: str, message: str) -> bool:
        def failed(record):
            if not self._holds(record, token):
                return False
            self.marker_path(job_id).unlink(missing_ok=True)
            record.update(status="failed", lease=None, completed_at=int(time.time()))
            record["error"] = {"code": code, "message": message}
            self._event(record, "failed", attempt=record["attempts"], reason=code)

        done = self.update(job_id, failed) is not None
        if done:
            self._cleanup(job_id, keep_result=False)
        else:
            self.forget_if_deleted(job_id)
        return done

    def delete(self, job_id: str) -> bool:
        """Remove the job with its uploads, work files and result (a running one stops at its next heartbeat)."""
        with self.locked():
            record = self.get(job_id)
            if record is None:
                return False
            self.record_path(job_id).unlink(missing_ok=True)
            self.marker_path(job_id).unlink(missing_ok=True)
        self._cleanup(job_id, keep_result=False)
        return True

    def sweep(self, ttl_seconds: float) -> list[str]:
        """Delete the jobs finished more than `ttl_seconds` ago; returns their ids."""
        now = time.time()
        expired = [
            r["id"]
            for r in self.jobs()
            if r["status"] not in UNFINISHED and now - (r["completed_at"] or now) > ttl_seconds
        ]
        for job_id in expired:
            self.delete(job_id)
        return expired

    def forget_if_deleted(self, job_id: str) -> None:
        """Files a run left behind after its job was deleted (written after the deletion swept them)."""
        if not self.record_path(job_id).exists():
            self._cleanup(job_id, keep_result=False)

    def _cleanup(self, job_id: str, keep_result: bool) -> None:
        """Drop what only an unfinished job needs (uploads, attempts' files, resume folder); the result too unless
        kept. A job deleted meanwhile loses its result as well."""
        for folder in (self.upload_dir(job_id), self.work_dir(job_id), self.resume_dir(job_id)):
            shutil.rmtree(folder, ignore_errors=True)
        if not keep_result or not self.record_path(job_id).exists():
            self.result_path(job_id).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- worker
PROGRESS = re.compile(r"(step|window) (\d+)/(\d+)")


class JobWorker:
    """Runs one task's jobs from a `JobStore` on one pipeline (loaded once). `options`: the server's
    `GenerationRequest` fields (model folder, memory presets, device) applied to every job."""

    def __init__(self, task: str, store: JobStore, **options):
        self.task = task
        self.store = store
        self.options = options
        self.runner = JobRunner()
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "worker": secrets.token_hex(4)}
        self.heartbeat_every = max(0.2, store.lease_seconds / 6)

    def preload(self) -> None:
        """Load the pipeline now (a replica is ready once its weights are in)."""
        self.runner.pipeline(GenerationRequest(task=self.task, **self.options))

    def job_request(self, record: dict) -> GenerationRequest:
        """The record's request with the server's options, this attempt's output file and, for pipelines that
        resume (the talking avatar), the job's resume folder on the store (so another replica continues it)."""
        job_id = record["id"]
        extra = {}
        if "resume_dir" in TASKS[self.task].options:
            extra["resume_dir"] = str(self.store.resume_dir(job_id))
        output = self.store.work_dir(job_id) / f"attempt-{record['attempts']}.mp4"
        fields = {**record["request"], **self.options, **extra}
        return GenerationRequest(task=self.task, output=str(output), overwrite=True, **fields)

    def run_job(self, job_id: str) -> str:
        """Claim and run the job; returns its final status here ('skipped' when it was not this worker's to run)."""
        record = self.store.claim(job_id, self.holder)
        if record is None:
            return "skipped"
        token = record["lease"]["token"]
        request = self.job_request(record)
        Path(request.output).parent.mkdir(parents=True, exist_ok=True)
        stop = threading.Event()
        beats = threading.Thread(target=self._beat, args=(job_id, token, stop), daemon=True)
        beats.start()
        try:
            path = self.runner(request, progress=self._progress(job_id, token, record["attempts"]), job=job_id)
        except Cancelled:
            self.store.forget_if_deleted(job_id)
            return "cancelled"
        except Exception as error:  # noqa: BLE001 (the job fails with the reason; the replica goes on)
            failure = reported(error)  # an input refused during the run, or a run that failed on purpose: one line
            if failure is None:
                message, code = f"{type(error).__name__}: {error}", "generation_failed"
            else:
                message = str(failure)
                code = "generation_failed" if isinstance(failure, RunFailure) else "invalid_request"
            self.store.fail(job_id, token, code, public_message(message, [self.store.root]))
            return "failed"
        finally:
            stop.set()
            beats.join()
        return "completed" if self.store.complete(job_id, token, Path(path)) else "superseded"

    def _beat(self, job_id: str, token: str, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_every):
            if not self.store.heartbeat(job_id, token):
                self.runner.cancel(job_id)  # deleted, cancelled or taken over: stop at the next step
                return

    def _progress(self, job_id: str, token: str, attempt: int):
        """The runner's progress callback -> the record's percentage and step/window detail (written at most
        every half second, and at every finished window and last step). Multi-window runs count finished windows
        plus the current window's steps once the first window has told how many there are."""
        windowed = "callback_on_window_end" in inspect.signature(TASKS[self.task].pipeline_class.__call__).parameters
        state = {"step": 0, "steps": None, "window": 0, "windows": None, "written": 0.0}

        def report(fraction: float, desc: str = "") -> None:
            match = PROGRESS.search(desc or "")
            event = {}
            if match and match.group(1) == "window":  # the pipeline's window index: finished clips - 1
                state.update(window=int(match.group(2)) + 1, windows=int(match.group(3)), step=0)
                event = {"event": "window", "attempt": attempt, "window": state["window"]}
            elif match:
                state.update(step=int(match.group(2)), steps=int(match.group(3)))
            if state["windows"]:
                percent = 100 * (state["window"] + state["step"] / (state["steps"] or 1)) / state["windows"]
            else:
                percent = 0 if windowed else 100 * fraction
            detail = {key: state[key] for key in ("step", "steps", "window", "windows")}
            now = time.monotonic()
            if event or state["step"] == state["steps"] or now - state["written"] >= 0.5:
                state["written"] = now
                if not self.store.heartbeat(job_id, token, progress=percent, detail=detail, **event):
                    self.runner.cancel(job_id)

        return report
