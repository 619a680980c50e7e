"""Strict loading of converted pipeline folders: the right pipeline class, every file present and whole, every
weight of every component found in the checkpoint; otherwise one `ValueError` naming the component, the file and
what is wrong, raised before (or instead of) running anything with random weights.

Layer: the loaders (imports nothing of the package). Before any weight is read, `check_pipeline_folder` checks
`model_index.json`, every subfolder, shard and safetensors header, and compares every model's tensors (names and
shapes from the headers) with the model its config describes, built on the meta device. `load_pipeline_folder`
(the command line) then loads each component with its own library's `from_pretrained(...,
output_loading_info=True)` and checks that report too. `StrictPipelineLoadingMixin` gives the pipelines'
`from_pretrained` the same checks, and `DiffusionPipeline.from_pretrained(folder)` a check of every loaded model
against its files.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import re
import struct
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


MODEL_INDEX = "model_index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _fail(folder: Path, component: str | None, file: str | None, what: str) -> ValueError:
    where = f"component `{component}`" if component else "the folder"
    in_file = f" ({file})" if file else ""
    return ValueError(f"model folder {folder}: {where}{in_file}: {what}")


#: the config file a saved component's subfolder holds (diffusers models, schedulers, transformers models,
#: processors, tokenizers)
COMPONENT_CONFIG_FILES = ("config.json", "scheduler_config.json", "preprocessor_config.json", "tokenizer_config.json")


def saved_component_folders(folder: str | os.PathLike) -> list[str]:
    """The subfolders of `folder` holding a saved component (one of `COMPONENT_CONFIG_FILES`): a saved pipeline's
    layout, with or without its `model_index.json` (a ComfyUI models folder holds weight files, no configs)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        sub.name for sub in folder.iterdir() if any((sub / name).is_file() for name in COMPONENT_CONFIG_FILES)
    )


def _missing_index(folder: Path) -> ValueError:
    saved = saved_component_folders(folder)
    if saved:
        listed = ", ".join(f"{name}/" for name in saved[:3]) + (
            f", ... {len(saved)} subfolders" if len(saved) > 3 else ""
        )
        return _fail(
            folder,
            None,
            MODEL_INDEX,
            f"missing, but the folder holds a saved pipeline's components ({listed}): restore its "
            f"{MODEL_INDEX} (copy it from the original conversion) or convert the weights again",
        )
    return _fail(folder, None, MODEL_INDEX, "missing; not a diffusers pipeline folder")


def read_model_index(folder: str | os.PathLike, pipeline_class: type | None = None) -> dict[str, Any]:
    """`model_index.json` of `folder`, checked: a JSON object with a `_class_name` and a `[library, class]` pair
    (or `[null, null]`) per component; with `pipeline_class`, a folder made for another pipeline is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"model folder {folder}: not a folder (give a converted SkyReels-V3 pipeline folder).")
    path = folder / MODEL_INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise _missing_index(folder) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(folder, None, MODEL_INDEX, f"unreadable ({error})") from None
    if not isinstance(index, dict):
        raise _fail(folder, None, MODEL_INDEX, f"holds a JSON {type(index).__name__}, not an object (damaged)")
    if not isinstance(index.get("_class_name"), str):
        raise _fail(folder, None, MODEL_INDEX, "has no `_class_name` (damaged)")
    for name, entry in index.items():
        if name.startswith("_"):
            continue
        pair = isinstance(entry, list) and len(entry) == 2
        if not pair or not (all(isinstance(v, str) for v in entry) or entry == [None, None]):
            raise _fail(
                folder, None, MODEL_INDEX, f"entry `{name}` is {json.dumps(entry)}, not [library, class] (damaged)"
            )
    if pipeline_class is not None and index["_class_name"] != pipeline_class.__name__:
        raise _fail(
            folder,
            None,
            MODEL_INDEX,
            f"holds a {index['_class_name']}, but this task needs a "
            f"{pipeline_class.__name__} (pick the folder converted for this task)",
        )
    return index


#: bytes per element of the safetensors dtypes
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
_DTYPE_BYTES.update(dict.fromkeys(("I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0"), 1))


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of a safetensors file, after checking its header (every entry's dtype, shape and byte
    range consistent) and that the file holds all the data it declares: a truncated download or a damaged header
    fails here with a `ValueError` naming the file (and the tensor), instead of deep inside a loader."""
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
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: the header is not a JSON object (damaged)")
    shapes, end = {}, 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
        valid = (
            isinstance(shape, list)
            and all(isinstance(n, int) and n >= 0 for n in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(n, int) for n in offsets)
            and 0 <= offsets[0] <= offsets[1]
            and entry.get("dtype") in _DTYPE_BYTES
            and offsets[1] - offsets[0] == math.prod(shape) * _DTYPE_BYTES[entry["dtype"]]
        )
        if not valid:
            raise ValueError(
                f"{path.name}: tensor `{key}` has no valid dtype, shape and data_offsets in the header (damaged)"
            )
        shapes[key], end = shape, max(end, offsets[1])
    if 8 + header_len + end > size:
        raise ValueError(f"{path.name}: truncated: {size} bytes, {8 + header_len + end} expected")
    return shapes


def check_safetensors(path: Path) -> list[str]:
    """Keys of a safetensors file, after the checks of `safetensors_shapes`."""
    return sorted(safetensors_shapes(path))


def check_weight_files(folder: Path, component: str) -> None:
    """Every shard an index names exists and every safetensors file is whole."""
    sub = folder / component
    indexes = sorted(sub.glob("*.safetensors.index.json"))
    files = sorted(p for p in sub.iterdir() if p.suffix in WEIGHT_SUFFIXES) if sub.is_dir() else []
    for index_path in indexes:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            shards = {s for s in weight_map.values() if isinstance(s, str)}
        except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as error:
            raise _fail(folder, component, index_path.name, f"unreadable shard index ({error})") from None
        missing = sorted(s for s in shards if not (sub / s).is_file())
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


def _needed_components(pipeline_class: type) -> list[str]:
    """The components `pipeline_class.__init__` takes (all of them, minus its `_optional_components`)."""
    names = [n for n in inspect.signature(pipeline_class.__init__).parameters if n != "self"]
    return [n for n in names if n not in getattr(pipeline_class, "_optional_components", ())]


def check_pipeline_folder(
    folder: str | os.PathLike, pipeline_class: type, given: Iterable[str] = ()
) -> dict[str, type | None]:
    """What can be checked of a pipeline folder before any weight is read: `model_index.json` (structure and
    pipeline class), every component the pipeline needs listed (`[null, null]` only where the caller passes it in
    `given`), its class importable, its subfolder present, and for models every shard present and every
    safetensors file whole. Returns {component: class, or None for a `[null, null]` entry} of the components to
    load (those in `given` excluded); the first problem raises one `ValueError` naming the file."""
    folder, given = Path(folder), set(given)
    index = read_model_index(folder, pipeline_class)
    for name in _needed_components(pipeline_class):
        if name not in given and index.get(name, [None, None]) == [None, None]:
            listed = "is [null, null] (saved without it)" if name in index else "is not listed"
            raise _fail(
                folder,
                name,
                MODEL_INDEX,
                f"{listed}, but {pipeline_class.__name__} needs a `{name}` (convert the folder again; from "
                f"Python, `{name}=...` passes one in)",
            )
    classes = {}
    for name, (library, class_name) in ((n, e) for n, e in index.items() if not n.startswith("_")):
        if name in given:
            continue
        if library is None:
            classes[name] = None
            continue
        cls = classes[name] = _component_class(folder, name, library, class_name)
        if not (folder / name).is_dir():
            raise _fail(folder, name, f"{name}/", "the subfolder is missing")
        if _is_model(cls):
            check_weight_files(folder, name)
            check_weights_against_config(folder, name, cls)
    return classes


def _model_on_meta(folder: Path, name: str, cls: type):
    """`cls` built from `folder/name`'s config on the meta device (no memory, no weights read), or None for a
    folder saved quantised (its tensors do not have the model's shapes)."""
    from transformers import PreTrainedModel

    sub = folder / name
    try:
        if issubclass(cls, PreTrainedModel):
            config = cls.config_class.from_pretrained(sub)
            if getattr(config, "quantization_config", None):
                return None
            with torch.device("meta"):
                return cls(config)
        config = cls.load_config(sub)
        if config.get("quantization_config"):
            return None
        with torch.device("meta"):
            return cls.from_config(config)
    except Exception as error:  # noqa: BLE001 (a damaged config raises many types)
        raise _fail(folder, name, f"{name}/config.json", f"cannot build a {cls.__name__} from it ({error})") from None


def _weights_label(sub: Path) -> str:
    """The file a component's weights are named by: its shard index, else its safetensors file."""
    files = sorted(sub.glob("*.safetensors.index.json")) or sorted(sub.glob("*.safetensors")) or [sub]
    return f"{sub.name}/{files[0].name}"


def check_weights_against_config(folder: Path, name: str, cls: type) -> None:
    """The tensors of `folder/name`'s weight files (names and shapes, from the headers) are exactly those of the
    model its config describes (built on the meta device): missing, unexpected or mis-shaped tensors raise a
    `ValueError` naming the folder, component, file and tensors, before any weight is read."""
    model = _model_on_meta(folder, name, cls)
    if model is None:
        return
    problems = weight_problems(model, _component_shapes(folder, name))
    if problems:
        raise _fail(folder, name, _weights_label(folder / name), _mismatch_message(problems, cls))


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
    problems = [
        _listed(len(values), label, values)
        for key, label in (
            ("missing_keys", "missing weights"),
            ("unexpected_keys", "unexpected weights"),
            ("mismatched_keys", "weights of the wrong shape"),
            ("error_msgs", "load errors"),
        )
        if (values := sorted(str(v) for v in (info.get(key) or ())))
    ]
    if problems:
        raise _fail(folder, name, f"{name}/", _mismatch_message(problems, cls))
    _CHECKED.add(model)
    return model


def _listed(count: int, label: str, values: list[str]) -> str:
    shown = ", ".join(values[:5]) + (f" and {len(values) - 5} more" if len(values) > 5 else "")
    return f"{count} {label} ({shown})"


def _mismatch_message(problems: list[str], cls: type) -> str:
    return "; ".join(problems) + f" — the checkpoint does not match its {cls.__name__} config (damaged or incomplete)"


def load_pipeline_folder(
    folder: str | os.PathLike,
    pipeline_class: type,
    torch_dtype: torch.dtype | dict[str, torch.dtype] | None = None,
    **given,
):
    """Build `pipeline_class` from a converted folder, strictly.

    First checks everything that needs no weights (`check_pipeline_folder`: `model_index.json`, the pipeline
    class, every subfolder, shard and safetensors header), then loads every component from its subfolder
    (`torch_dtype`: one dtype, or {component: dtype} with an optional "default") and raises one `ValueError` naming
    the component, the file and the problem for missing/unexpected/mismatched weights. Components passed in
    `given` (e.g. a transformer loaded from a single file, or None for an encoder this process does not run) are
    used as they are.
    """
    folder = Path(folder)
    classes = check_pipeline_folder(folder, pipeline_class, given)
    components = dict(given)
    for name, cls in classes.items():
        dtype = torch_dtype.get(name, torch_dtype.get("default")) if isinstance(torch_dtype, dict) else torch_dtype
        components[name] = None if cls is None else load_component(folder, name, cls, dtype)
    return pipeline_class(**components)


# ------------------------------------------------------------------------------- models loaded by diffusers itself

#: models already checked against their files (by `load_component` or `check_loaded_component`)
_CHECKED: weakref.WeakSet = weakref.WeakSet()
_WEIGHT_FILE_PREFIXES = ("diffusion_pytorch_model", "pytorch_model", "model")


def checkpoint_shapes(sub: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of every weight file of a component folder, from the headers (safetensors; torch
    `.bin` files, loaded on the meta device, only where no safetensors file exists)."""
    files = sorted(
        p for p in sub.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.name.startswith(_WEIGHT_FILE_PREFIXES)
    )
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    shapes = {}
    for path in safetensors or files:
        if path.suffix == ".safetensors":
            shapes.update(safetensors_shapes(path))
            continue
        try:
            state = torch.load(path, map_location="meta", weights_only=True)
        except Exception as error:  # noqa: BLE001 (a damaged pickle raises many types)
            raise ValueError(f"{path.name}: unreadable ({error})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path.name}: holds a {type(state).__name__}, not a state dict")
        shapes.update({k: list(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)})
    return shapes


def _component_shapes(folder: Path, name: str) -> dict[str, list[int]]:
    try:
        return checkpoint_shapes(folder / name)
    except ValueError as error:
        file, what = str(error).split(": ", 1)
        raise _fail(folder, name, f"{name}/{file}", what) from None


def _tied_keys(model, shapes: dict) -> set[str]:
    """Parameters tied to another (transformers' tied embeddings): present when either side is in the file."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    if not isinstance(tied, dict):
        return set(tied)
    return {key for pair in tied.items() if any(k in shapes for k in pair) for key in pair}


def weight_problems(model, shapes: dict[str, list[int]]) -> list[str]:
    """How a loaded model's state dict differs from its checkpoint's tensors (names and shapes): missing weights
    (other than tied ones and the class's `_keys_to_ignore_on_load_missing`), unexpected ones (other than
    `_keys_to_ignore_on_load_unexpected`) and shape mismatches; empty when they agree."""
    state = {key: list(value.shape) for key, value in model.state_dict().items()}

    def ignored(attribute: str, key: str) -> bool:
        return any(re.search(pattern, key) for pattern in getattr(model, attribute, None) or ())

    tied = _tied_keys(model, shapes)
    missing = [
        k for k in state if k not in shapes and k not in tied and not ignored("_keys_to_ignore_on_load_missing", k)
    ]
    unexpected = [k for k in shapes if k not in state and not ignored("_keys_to_ignore_on_load_unexpected", k)]
    wrong = [
        f"{k}: {shapes[k]} in the file, {state[k]} in the model"
        for k in shapes
        if k in state and shapes[k] != state[k]
    ]
    found = ((missing, "missing weights"), (unexpected, "unexpected weights"), (wrong, "weights of the wrong shape"))
    return [_listed(len(keys), label, sorted(keys)) for keys, label in found if keys]


def check_loaded_component(model, name: str) -> None:
    """Check a model that diffusers' `DiffusionPipeline.from_pretrained` loaded from a pipeline folder's `name`
    subfolder against that subfolder's weight files (it warns about missing weights and initialises them at
    random). Models not loaded from such a folder (passed in, built in memory), quantised models and models
    carrying adapters are left alone; `ValueError` naming the folder, component, file and tensors otherwise."""
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    if model in _CHECKED or not source or Path(source).name != name or not Path(source).is_dir():
        return
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "peft_config", None):
        return
    sub = Path(source)
    problems = weight_problems(model, _component_shapes(sub.parent, name))
    if problems:
        raise _fail(sub.parent, name, _weights_label(sub), _mismatch_message(problems, type(model)))
    _CHECKED.add(model)


class StrictPipelineLoadingMixin:
    """Strict `from_pretrained` for diffusers pipelines (listed before `DiffusionPipeline` in the bases).

    `Pipeline.from_pretrained(folder)` first checks what needs no weights (`check_pipeline_folder`: a damaged
    `model_index.json`, a `[null, null]` component, a missing subfolder or shard, a truncated or damaged
    safetensors file, tensors that differ from those of the model's config: one `ValueError` naming the file),
    then loads through diffusers as usual (every `from_pretrained` argument keeps working). Every model diffusers
    loaded from the folder is then compared with its weight files (`check_loaded_component`: missing, unexpected or
    mis-shaped tensors raise a `ValueError` naming the component, the file and the tensors, where diffusers and
    transformers only warn). The comparison runs where diffusers' loader ends, when it records `_name_or_path` on
    the new pipeline (`register_to_config`), so `DiffusionPipeline.from_pretrained(folder)` is checked the same way
    once the package is imported (it resolves the class from `model_index.json`).
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        if os.path.isdir(pretrained_model_name_or_path):
            check_pipeline_folder(
                pretrained_model_name_or_path, cls, given=[k for k in kwargs if k in _needed_components(cls)]
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def register_to_config(self, **kwargs) -> None:
        super().register_to_config(**kwargs)
        if "_name_or_path" in kwargs:
            for name, component in self.components.items():
                if isinstance(component, torch.nn.Module):
                    check_loaded_component(component, name)
