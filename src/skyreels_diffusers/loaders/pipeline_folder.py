"""Strict loading of converted pipeline folders: the right pipeline class, every file present and whole, every
weight of every component found in the checkpoint; otherwise one `ValueError` naming the component, the file and
what is wrong, raised before (or instead of) running anything with random weights.

Layer: the loaders (imports nothing of the package). Each component is loaded from its subfolder with
its own library's `from_pretrained(..., output_loading_info=True)` (diffusers and transformers both report missing,
unexpected and mismatched keys there instead of failing), then the pipeline is built from the components.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch


MODEL_INDEX = "model_index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _fail(folder: Path, component: str | None, file: str | None, what: str) -> ValueError:
    where = f"component `{component}`" if component else "the folder"
    in_file = f" ({file})" if file else ""
    return ValueError(f"model folder {folder}: {where}{in_file}: {what}")


def read_model_index(folder: str | os.PathLike, pipeline_class: type | None = None) -> dict[str, Any]:
    """`model_index.json` of `folder`; with `pipeline_class`, refuses a folder made for another pipeline."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"model folder {folder}: not a folder (give a converted SkyReels-V3 pipeline folder).")
    path = folder / MODEL_INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise _fail(folder, None, MODEL_INDEX, "missing; not a diffusers pipeline folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(folder, None, MODEL_INDEX, f"unreadable ({error})") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise _fail(folder, None, MODEL_INDEX, "has no `_class_name`")
    if pipeline_class is not None and index["_class_name"] != pipeline_class.__name__:
        raise _fail(
            folder,
            None,
            MODEL_INDEX,
            f"holds a {index['_class_name']}, but this task needs a "
            f"{pipeline_class.__name__} (pick the folder converted for this task)",
        )
    return index


def check_safetensors(path: Path) -> list[str]:
    """Keys of a safetensors file, after checking its header and that the file holds all the data it declares
    (a truncated download fails here, naming the file, instead of deep inside the loader)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name}: {size} bytes, too short for a safetensors file (truncated?)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ValueError(
                f"{path.name}: header of {header_len} bytes in a {size}-byte file (truncated or not "
                "a safetensors file)"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path.name}: the header is not valid safetensors JSON (damaged)") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + header_len + end > size:
        raise ValueError(f"{path.name}: truncated: {size} bytes, {8 + header_len + end} expected")
    return sorted(tensors)


def check_weight_files(folder: Path, component: str) -> None:
    """Every shard an index names exists and every safetensors file is whole."""
    sub = folder / component
    indexes = sorted(sub.glob("*.safetensors.index.json"))
    files = sorted(p for p in sub.iterdir() if p.suffix in WEIGHT_SUFFIXES) if sub.is_dir() else []
    for index_path in indexes:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise _fail(folder, component, index_path.name, f"unreadable shard index ({error})") from None
        missing = sorted({s for s in weight_map.values() if not (sub / s).is_file()})
        if missing:
            raise _fail(folder, component, index_path.name, f"missing shard(s): {', '.join(missing)}")
    if not files:
        raise _fail(folder, component, f"{component}/", "no weight files (*.safetensors)")
    for path in files:
        if path.suffix == ".safetensors":
            try:
                check_safetensors(path)
            except ValueError as error:
                raise _fail(folder, component, f"{component}/{path.name}", str(error).split(": ", 1)[1]) from None


def _component_class(folder: Path, name: str, library: str, class_name: str) -> type:
    try:
        return getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        raise _fail(folder, name, MODEL_INDEX, f"unknown class {library}.{class_name}") from None


def _is_model(cls: type) -> bool:
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    return issubclass(cls, (ModelMixin, PreTrainedModel))


def load_component(folder: Path, name: str, cls: type, torch_dtype: torch.dtype | None) -> Any:
    """One component from `folder/name`, strictly (models: no missing, unexpected or mismatched weight)."""
    if not (folder / name).is_dir():
        raise _fail(folder, name, f"{name}/", "the subfolder is missing")
    if not _is_model(cls):
        try:
            return cls.from_pretrained(folder, subfolder=name)
        except Exception as error:  # noqa: BLE001 (tokenizers, schedulers, processors raise many types)
            raise _fail(folder, name, f"{name}/", f"cannot be loaded as {cls.__name__} ({error})") from None
    check_weight_files(folder, name)
    from transformers import PreTrainedModel

    dtype = (
        {} if torch_dtype is None else {"dtype" if issubclass(cls, PreTrainedModel) else "torch_dtype": torch_dtype}
    )
    try:
        model, info = cls.from_pretrained(folder, subfolder=name, output_loading_info=True, **dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise _fail(folder, name, f"{name}/", f"cannot be loaded as {cls.__name__} ({error})") from None
    problems = []
    for key, label in (
        ("missing_keys", "missing weights"),
        ("unexpected_keys", "unexpected weights"),
        ("mismatched_keys", "weights of the wrong shape"),
        ("error_msgs", "load errors"),
    ):
        values = sorted(str(v) for v in (info.get(key) or ()))
        if values:
            shown = ", ".join(values[:5]) + (f" and {len(values) - 5} more" if len(values) > 5 else "")
            problems.append(f"{len(values)} {label} ({shown})")
    if problems:
        raise _fail(
            folder,
            name,
            f"{name}/",
            "; ".join(problems) + " — the checkpoint does not match its "
            f"{cls.__name__} config (damaged or incomplete)",
        )
    return model


def load_pipeline_folder(
    folder: str | os.PathLike,
    pipeline_class: type,
    torch_dtype: torch.dtype | dict[str, torch.dtype] | None = None,
    **given,
):
    """Build `pipeline_class` from a converted folder, strictly.

    Refuses, before any weight is read, a folder whose `model_index.json` names another pipeline class, then loads
    every component from its subfolder (`torch_dtype`: one dtype, or {component: dtype} with an optional
    "default") and raises one `ValueError` naming the component, the file and the problem for a missing subfolder,
    missing shard, truncated safetensors file, or missing/unexpected/mismatched weights. Components passed in
    `given` (e.g. a transformer loaded from a single file, or None for an encoder this process does not run) are
    used as they are.
    """
    folder = Path(folder)
    index = read_model_index(folder, pipeline_class)
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, (list, tuple)) or len(entry) != 2:
            continue
        library, class_name = entry
        if name in given:
            components[name] = given[name]
            continue
        if library is None or class_name is None:
            components[name] = None
            continue
        dtype = torch_dtype.get(name, torch_dtype.get("default")) if isinstance(torch_dtype, dict) else torch_dtype
        cls = _component_class(folder, name, library, class_name)
        components[name] = load_component(folder, name, cls, dtype)
    return pipeline_class(**components)
