"""Resume folders of long multi-window runs (the talking avatar's): fingerprint, checksummed atomic files, checks,
and `resumable_windows`, which drives a run's windows through a folder.

A folder holds `state.pt` (a plain dict of tensors, numbers and strings, read with `weights_only=True`: the next
window, the motion frames, the generator, the checksum of every finished window file), `keyframes.pt` (written
once, after the keyframe clip) and one `window_NNNNN.npy` per finished window (uint8 frames, read with
`allow_pickle=False`). Every file appears atomically (written and synced under a hidden name, then renamed; the
hidden file is removed when the write fails), so a kill, a full disk or a lost write at any moment leaves the
previous consistent state. `state.pt` and `keyframes.pt` carry a SHA-256 of their own content and the state one of
each window file: a file damaged on disk is refused, naming it, before any of it reaches a video (a damaged window
cannot be recomputed: the state it was made from is gone). A folder that does not belong to the run is refused
with one line saying why, never mixed into a video. The store knows no ranks: the caller says whether this process
writes (`writer`), every process reads.

The run's fingerprint is canonical: the same inputs, weights and settings give the same fingerprint in every
process, whatever Python's hash seed (sets and diffusers' `_use_default_values` sorted, no memory addresses, no
paths the weights were read from), so a killed run resumes in a new process.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import pickle
import re
import secrets
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..errors import InputError


STATE_FILE = "state.pt"
KEYFRAMES_FILE = "keyframes.pt"
#: the layout of the files this version writes (a state of another layout is refused as an earlier version's)
FORMAT = 2
STATE_KEYS = ("format", "fingerprint", "next_window", "motion", "generator", "window_checksums", "checksum")
#: parameters read per tensor for the weights digest (strided over the whole tensor)
DIGEST_SAMPLES = 64
#: config entries that describe the process, not the model: which values were defaults (diffusers lists them from a
#: set, in an order that follows the hash seed; the values themselves are in the config) and the folder the weights
#: were read from (the same weights under another path are the same run; the weights digest tells weights apart)
PROCESS_CONFIG_KEYS = ("_use_default_values", "_name_or_path")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# ---------------------------------------------------------------------------------------------- fingerprints
def canonical(value: Any) -> Any:
    """A JSON value standing for `value` that is the same in every process: mappings with string keys (sorted when
    dumped), sets sorted, tuples as lists, tensors and arrays as a digest of their bytes with shape and dtype, dtypes,
    devices and paths as text, and any other object as its class and its `repr` without memory addresses.

    >>> canonical({"b": {"y", "x"}, "a": (1, torch.float16)})
    {'b': ['x', 'y'], 'a': [1, 'torch.float16']}
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return {"shape": list(value.shape), "dtype": str(value.dtype), "sha256": _array_digest(value)}
    if isinstance(value, np.generic):
        return canonical(value.item())
    if isinstance(value, Mapping):
        return {str(key): canonical(item) for key, item in value.items() if key not in PROCESS_CONFIG_KEYS}
    if isinstance(value, (set, frozenset)):
        return sorted((canonical(item) for item in value), key=_dumps)
    if isinstance(value, (list, tuple)):
        return [canonical(item) for item in value]
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, (torch.dtype, torch.device, os.PathLike)):
        return str(value)
    return f"{type(value).__module__}.{type(value).__qualname__}:{_ADDRESS.sub('', repr(value))}"


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _array_digest(value: torch.Tensor | np.ndarray) -> str:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()


def module_identity(module: torch.nn.Module | None) -> dict[str, Any] | None:
    """What of a model changes its outputs, cheaply: its config, its parameters' names, shapes, dtypes and tensor
    classes (FP8 storage and torchao quantisation show here), hooks that change the forward (layerwise casting),
    and a digest of `DIGEST_SAMPLES` strided values of every parameter (different weights -> different digest).
    The same in every process (`canonical`)."""
    if module is None:
        return None
    digest = hashlib.sha256()
    layout = []
    for name, param in module.named_parameters():
        layout.append([name, list(param.shape), str(param.dtype), type(param.data).__name__])
        digest.update(_sample_bytes(param))
    for name, buffer in module.named_buffers():
        layout.append([name, list(buffer.shape), str(buffer.dtype)])
    hooks = sorted(
        {
            type(hook).__name__
            for sub in module.modules()
            for hook in getattr(getattr(sub, "_diffusers_hook", None), "hooks", {}).values()
        }
    )
    config = getattr(module, "config", {}) or {}
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return canonical(
        {
            "class": type(module).__name__,
            "config": config,
            "layout": layout,
            "hooks": hooks,
            "weights": digest.hexdigest(),
        }
    )


def _sample_bytes(param: torch.Tensor) -> bytes:
    try:
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // DIGEST_SAMPLES)
        return flat[::step][:DIGEST_SAMPLES].float().cpu().numpy().tobytes()
    except (RuntimeError, NotImplementedError, TypeError):  # meta / offloaded / quantised subclass: layout only
        return f"{type(param).__name__}{tuple(param.shape)}".encode()


def fingerprint(*parts: Any) -> str:
    """SHA-256 over tensors (their float32 bytes) and any other parts in their `canonical` form: the same in every
    process for the same values."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.detach().float().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(_dumps(canonical(part)).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- the folder
def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def check_resume_folder(folder: str | os.PathLike, needed_bytes: int = 0, name: str = "resume_dir") -> None:
    """Whether `folder` can take a run's resume files, before any model work: a folder (or a path where one can be
    made) that this process can write, on a disk with room for `needed_bytes` more than the resume files already
    there. A probe file is written and removed in the folder, or in its nearest existing parent
    when it is still to be made (nothing is created). Raises `InputError` naming `name`."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise InputError(name, f"{path} is a file; give a folder (it is created when missing).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(name, f"cannot create the folder {path} ({existing} is a file).")
    probe = existing / f".resume-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(probe, "xb") as file:
            file.write(b"\0" * 4096)
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        raise InputError(
            name, f"cannot write in {existing} ({error.strerror or error}); give a folder on a writable disk."
        ) from None
    finally:
        probe.unlink(missing_ok=True)
    there = sum(f.stat().st_size for f in path.glob("window_*.npy")) if path.is_dir() else 0
    free = shutil.disk_usage(existing).free
    if needed_bytes - there > free:
        raise InputError(
            name,
            f"{path} is on a disk with {_size(free)} free; the run's resume files need about "
            f"{_size(needed_bytes - there)} more (every finished window's frames). Free some space or give a "
            "folder on another disk.",
        )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _content_digest(content: dict[str, Any]) -> str:
    """SHA-256 of a saved dict's entries (tensors by their exact bytes), without its own `checksum`."""
    return hashlib.sha256(
        _dumps(canonical({k: v for k, v in content.items() if k != "checksum"})).encode()
    ).hexdigest()


class ResumeStore:
    """One run's resume folder: `load()` the state (None when the folder is new), `windows(n)`, `save_state(...)`,
    `save_window(k, frames)`. Raises `InputError` naming `name` for a folder that cannot be this run's, is damaged
    or cannot be written."""

    def __init__(self, folder: str | os.PathLike, run_fingerprint: str, writer: bool = True, name: str = "resume_dir"):
        self.folder, self.fingerprint, self.writer, self.name = Path(folder), run_fingerprint, writer, name
        self.window_checksums: list[str] = []
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(name, f"{self.folder} is a file; give a folder (it is created when missing).")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(name, f"cannot create the folder {self.folder} ({error.strerror}).") from None

    @property
    def state_file(self) -> Path:
        return self.folder / STATE_FILE

    def window_file(self, k: int) -> Path:
        return self.folder / f"window_{k:05d}.npy"

    def _refuse(self, why: str) -> InputError:
        return InputError(
            self.name, f"{self.folder} {why}; use an empty folder (or delete this one) to start the run again."
        )

    def _damaged(self, file: str) -> InputError:
        return self._refuse(f"holds a damaged {file} (its checksum differs from the one written with it)")

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none. Refuses an unreadable, foreign or damaged state file, another
        run's state (different fingerprint), and missing or damaged window and keyframe files."""
        if not self.state_file.is_file():
            return None
        state = self._read(self.state_file)
        ours = isinstance(state, dict) and {"fingerprint", "next_window"} <= state.keys()
        if ours and ("keyframe_video" in state or state.get("format") != FORMAT):
            raise self._refuse(f"holds a {STATE_FILE} of an earlier version of skyreels-diffusers")
        if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
            raise self._refuse(f"holds a {STATE_FILE} that is not a resume state of skyreels-diffusers")
        if _content_digest(state) != state["checksum"]:
            raise self._damaged(STATE_FILE)
        if state["fingerprint"] != self.fingerprint:
            raise self._refuse("holds a different run (other inputs, seed, settings, weights, dtype or quantisation)")
        finished = int(state["next_window"])
        missing = [self.window_file(k).name for k in range(finished) if not self.window_file(k).is_file()]
        if missing:
            raise self._refuse(f"lacks the finished window file(s) {', '.join(missing)} its state refers to")
        for k, checksum in enumerate(state["window_checksums"][:finished]):
            if _file_digest(self.window_file(k)) != checksum:
                raise self._damaged(f"window file {self.window_file(k).name}")
        self.window_checksums = list(state["window_checksums"][:finished])
        state["keyframes"] = self._load_keyframes()
        return state

    def _read(self, path: Path) -> Any:
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except (
            pickle.UnpicklingError,
            RuntimeError,
            EOFError,
            OSError,
            ValueError,
            zipfile.BadZipFile,
            AttributeError,
            TypeError,
        ):
            # never retried with weights_only=False: a file that is not a plain state is not ours to unpickle
            if path.name == KEYFRAMES_FILE:
                raise self._refuse(f"holds a damaged {KEYFRAMES_FILE}") from None
            raise self._refuse(
                f"holds a {path.name} that is not a resume state of skyreels-diffusers "
                "(unreadable, damaged or written by something else)"
            ) from None

    def _load_keyframes(self) -> torch.Tensor:
        path = self.folder / KEYFRAMES_FILE
        if not path.is_file():
            raise self._refuse(f"lacks the {KEYFRAMES_FILE} its state refers to")
        saved = self._read(path)
        if not isinstance(saved, dict) or saved.get("fingerprint") != self.fingerprint:
            raise self._refuse(f"holds a {KEYFRAMES_FILE} of a different run")
        if "checksum" not in saved or _content_digest(saved) != saved["checksum"]:
            raise self._damaged(KEYFRAMES_FILE)
        return saved["keyframes"]

    def window(self, k: int) -> np.ndarray:
        """The frames of window `k` (a uint8 array)."""
        try:
            return np.load(self.window_file(k), allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise self._refuse(f"holds a damaged window file {self.window_file(k).name} ({error})") from None

    def windows(self, count: int) -> list[np.ndarray]:
        """The frames of windows 0 .. count-1 (uint8 arrays)."""
        return [self.window(k) for k in range(count)]

    def _write(self, path: Path, save: Callable[[Any], None]) -> None:
        """Write `path` atomically: `save(file)` into a hidden file, synced, then renamed over `path`; on any failure
        the hidden file is removed and a write error names the file, the folder and the reason."""
        tmp = path.with_name(f".{path.name}.tmp")  # one writer per folder: a leftover of a kill is replaced
        try:
            with open(tmp, "wb") as file:
                save(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException as error:
            tmp.unlink(missing_ok=True)
            if isinstance(error, OSError):
                raise InputError(
                    self.name,
                    f"cannot write {path.name} in {self.folder} ({error.strerror or error}); the windows finished "
                    "before it are kept there: free some space (or fix the disk) and run the same command again to "
                    "resume.",
                ) from None
            raise

    def save_keyframes(self, keyframes: torch.Tensor) -> None:
        """Atomically write the keyframes (writers only; once per run, after the keyframe clip)."""
        if not self.writer:
            return
        saved = {"fingerprint": self.fingerprint, "keyframes": keyframes.cpu()}
        saved["checksum"] = _content_digest(saved)
        self._write(self.folder / KEYFRAMES_FILE, lambda file: torch.save(saved, file))

    def save_state(self, **state: Any) -> None:
        """Atomically replace the state (writers only); the fingerprint, the checksums of the finished windows' files
        and the state's own checksum are added."""
        if not self.writer:
            return
        state = {"format": FORMAT, "fingerprint": self.fingerprint, **state}
        state["window_checksums"] = self.window_checksums[: int(state["next_window"])]
        state["checksum"] = _content_digest(state)
        self._write(self.state_file, lambda file: torch.save(state, file))

    def save_window(self, k: int, frames: np.ndarray) -> None:
        """Atomically write window `k`'s frames (writers only) and keep their file's checksum for the next state."""
        if not self.writer:
            return
        path = self.window_file(k)
        self._write(path, lambda file: np.save(file, np.ascontiguousarray(frames), allow_pickle=False))
        del self.window_checksums[k:]
        self.window_checksums.append(_file_digest(path))


def resumable_windows(run, folder: str | os.PathLike, writer: bool = True, name: str = "resume_dir") -> Iterator[Any]:
    """A run's windows through a resume folder: those a killed run finished (read back from the folder, in order,
    after every file's checksum is checked), then the rest as the run generates them, each saved before it is
    handed on (with `writer`).

    `run` is what `SkyReelsV3TalkingAvatarPipeline.windows(...)` returns: it gives the run's `fingerprint()`,
    `resume_bytes()` (what its files take), `generate(resume_from)`, `state_from_dict(state)` and
    `restored_window(k, frames)`. The same inputs, seed,
    settings and weights give the same windows whether the run was interrupted or not, in this process or another;
    anything else is refused (`InputError` naming `name`) before any generation, as is a folder that cannot be
    written or whose disk lacks the room the run's files need.
    """
    if writer:
        check_resume_folder(folder, run.resume_bytes(), name)
    store = ResumeStore(folder, run.fingerprint(), writer=writer, name=name)
    saved = store.load()
    resume_from = None
    if saved is not None:
        resume_from = run.state_from_dict(saved)
        for k in range(resume_from.next_window):
            yield run.restored_window(k, store.window(k))
    for window in run.generate(resume_from):
        if window.window is not None:
            store.save_window(window.window, window.frames)
        elif len(window.frames):  # the keyframe clip is the whole video: nothing to resume
            yield window
            continue
        else:
            store.save_keyframes(window.state.keyframes)
        store.save_state(**window.state.to_dict())
        yield window
