"""Resume folders of long multi-window runs (the talking avatar's): fingerprint, atomic files, checks, and
`resumable_windows`, which drives a run's windows through a folder.

A folder holds `state.pt` (a plain dict of tensors and numbers, read with `weights_only=True`: the next window, the
motion frames, the generator), `keyframes.pt` (written once, after the keyframe clip) and one `window_NNNNN.npy` per
finished window (uint8 frames, read with `allow_pickle=False`). Every file appears atomically (written under a
hidden name, then renamed), so a kill at any moment leaves the previous consistent state. A folder that does not
belong to the run is refused with one line saying why, never mixed into a video. The store knows no ranks: the
caller says whether this process writes (`writer`), every process reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch


STATE_FILE = "state.pt"
KEYFRAMES_FILE = "keyframes.pt"
STATE_KEYS = ("fingerprint", "next_window", "motion", "generator")
#: parameters read per tensor for the weights digest (strided over the whole tensor)
DIGEST_SAMPLES = 64


def module_identity(module: torch.nn.Module | None) -> dict[str, Any] | None:
    """What of a model changes its outputs, cheaply: its config, its parameters' names, shapes, dtypes and tensor
    classes (FP8 storage and torchao quantisation show here), hooks that change the forward (layerwise casting),
    and a digest of `DIGEST_SAMPLES` strided values of every parameter (different weights -> different digest)."""
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
    config = dict(getattr(module, "config", {}) or {})
    config = config.to_dict() if hasattr(config, "to_dict") else config
    if "_use_default_values" in config:  # diffusers lists these from a set: its order changes with the process
        config["_use_default_values"] = sorted(config["_use_default_values"])
    return {
        "class": type(module).__name__,
        "config": config,
        "layout": layout,
        "hooks": hooks,
        "weights": digest.hexdigest(),
    }


def _sample_bytes(param: torch.Tensor) -> bytes:
    try:
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // DIGEST_SAMPLES)
        return flat[::step][:DIGEST_SAMPLES].float().cpu().numpy().tobytes()
    except (RuntimeError, NotImplementedError, TypeError):  # meta / offloaded / quantised subclass: layout only
        return f"{type(param).__name__}{tuple(param.shape)}".encode()


def fingerprint(*parts: Any) -> str:
    """SHA-256 over tensors (their float32 bytes) and JSON-able parts (anything else by `str`)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.detach().float().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class ResumeStore:
    """One run's resume folder: `load()` the state (None when the folder is new), `windows(n)`, `save_state(...)`,
    `save_window(k, frames)`. Raises `ValueError` naming `name` for a folder that cannot be this run's."""

    def __init__(self, folder: str | os.PathLike, run_fingerprint: str, writer: bool = True, name: str = "resume_dir"):
        self.folder, self.fingerprint, self.writer, self.name = Path(folder), run_fingerprint, writer, name
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"`{name}`: {self.folder} is a file; give a folder (it is created when missing).")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"`{name}`: cannot create the folder {self.folder} ({error.strerror}).") from None

    @property
    def state_file(self) -> Path:
        return self.folder / STATE_FILE

    def window_file(self, k: int) -> Path:
        return self.folder / f"window_{k:05d}.npy"

    def _refuse(self, why: str) -> ValueError:
        return ValueError(
            f"`{self.name}`: {self.folder} {why}; use an empty folder (or delete this one) to start the run again."
        )

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none. Refuses an unreadable or foreign state file, another run's
        state (different fingerprint) and missing window files."""
        if not self.state_file.is_file():
            return None
        try:
            state = torch.load(self.state_file, weights_only=True, map_location="cpu")
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
            raise self._refuse(
                f"holds a {STATE_FILE} that is not a resume state of skyreels-diffusers "
                "(unreadable, damaged or written by something else)"
            ) from None
        if isinstance(state, dict) and "keyframe_video" in state:
            raise self._refuse(f"holds a {STATE_FILE} of an earlier version of skyreels-diffusers")
        if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
            raise self._refuse(f"holds a {STATE_FILE} that is not a resume state of skyreels-diffusers")
        if state["fingerprint"] != self.fingerprint:
            raise self._refuse("holds a different run (other inputs, seed, settings, weights, dtype or quantisation)")
        missing = [
            self.window_file(k).name for k in range(int(state["next_window"])) if not self.window_file(k).is_file()
        ]
        if missing:
            raise self._refuse(f"lacks the finished window file(s) {', '.join(missing)} its state refers to")
        state["keyframes"] = self._load_keyframes()
        return state

    def _load_keyframes(self) -> torch.Tensor:
        path = self.folder / KEYFRAMES_FILE
        if not path.is_file():
            raise self._refuse(f"lacks the {KEYFRAMES_FILE} its state refers to")
        try:
            saved = torch.load(path, weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile):
            raise self._refuse(f"holds a damaged {KEYFRAMES_FILE}") from None
        if not isinstance(saved, dict) or saved.get("fingerprint") != self.fingerprint:
            raise self._refuse(f"holds a {KEYFRAMES_FILE} of a different run")
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

    def save_keyframes(self, keyframes: torch.Tensor) -> None:
        """Atomically write the keyframes (writers only; once per run, after the keyframe clip)."""
        if not self.writer:
            return
        tmp = self.folder / f".{KEYFRAMES_FILE}.tmp"
        torch.save({"fingerprint": self.fingerprint, "keyframes": keyframes.cpu()}, tmp)
        os.replace(tmp, self.folder / KEYFRAMES_FILE)

    def save_state(self, **state: Any) -> None:
        """Atomically replace the state (writers only); `fingerprint` is added."""
        if not self.writer:
            return
        state = {"fingerprint": self.fingerprint, **state}
        tmp = self.folder / f".{STATE_FILE}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.state_file)

    def save_window(self, k: int, frames: np.ndarray) -> None:
        """Atomically write window `k`'s frames (writers only)."""
        if not self.writer:
            return
        tmp = self.folder / f".{self.window_file(k).stem}.tmp.npy"
        np.save(tmp, np.ascontiguousarray(frames))
        os.replace(tmp, self.window_file(k))


def resumable_windows(run, folder: str | os.PathLike, writer: bool = True, name: str = "resume_dir") -> Iterator[Any]:
    """A run's windows through a resume folder: those a killed run finished (read back from the folder, in order),
    then the rest as the run generates them, each saved before it is handed on (with `writer`).

    `run` is what `SkyReelsV3TalkingAvatarPipeline.windows(...)` returns: it gives the run's `fingerprint()`,
    `generate(resume_from)`, `state_from_dict(state)` and `restored_window(k, frames)`. The same inputs, seed,
    settings and weights give the same windows whether the run was interrupted or not; anything else is refused
    (`ValueError` naming `name`) before any generation.
    """
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
