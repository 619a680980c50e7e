"""Whole original SkyReels-V3 repos -> diffusers pipeline folders.

* `reference_to_video` (the R2V repo, diffusers layout): `transformer/` through the transformer converter,
  `vae/`, `text_encoder/`, `tokenizer/` re-saved, a UniPC flow scheduler with shift 5 (the original replaced the
  repo's scheduler the same way).
* `video_extension` (Wan-native layout): `Wan2.1_VAE.pth` -> `AutoencoderKLWan`, `models_t5_umt5-xxl-enc-bf16.pth`
  -> `UMT5EncoderModel`, `google/umt5-xxl/` tokenizer; two pipeline folders, `single_shot_extension/` (from
  `transformer/`) and `shot_switching_extension/` (from `shot_transformer/`), UniPC flow scheduler with shift 8.
* `talking_avatar` (Wan-native, transformer at the root): as above plus the open-clip CLIP file ->
  `CLIPVisionModel`, `chinese-wav2vec2-base/` -> `Wav2Vec2Model` + feature extractor, the flow Euler scheduler with
  shift 11.

Where each repository keeps its components is the registry's `REPO_LAYOUTS` (a folder is re-saved, a `.pth` file
converted) and which tasks it holds, with their transformer folders and schedulers, its `TASKS`.

Each pipeline folder gets a `model_index.json` naming our classes and a model card. The transformer and the 11 GB
text encoder stream tensor by tensor (`tensor_io`: peak memory the largest tensor plus a constant, a progress bar
each); the small components (VAE, CLIP, wav2vec2) load whole. `.pth` files are read with only tensor-rebuilding
globals allowed (`weights_only=True` or `tensor_io`'s restricted unpickler). Output appears atomically: it is
written into a hidden temporary folder next to the destination (`.NAME.HOST.PID.RANDOM.tmp`) and renamed at the end;
an error, Ctrl-C or SIGTERM removes that folder, and one left by a killed run is swept by the next conversion.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..loaders.components import (
    T5_KEY_MAP,
    T5_TIED_KEY,
    check_keys,
    convert_clip,
    convert_wan_vae,
    load_wav2vec2,
    planned_tensors,
    require_file,
    t5_config,
)
from ..loaders.tensor_io import PlannedTensor, TensorSource, write_safetensors_shards
from ..loaders.transformer_conversion import (
    KEY_MAPS,
    VARIANT_LAYOUT,
    check_mapped_keys,
    convert_config,
    expected_state_shapes,
    map_keys,
)
from ..models import SkyReelsV3Transformer3DModel
from ..pipelines.video_io import pid_alive, sigterm_as_exit
from .tasks import REPO_LAYOUTS, REPOS, TASKS


def _planned_tensors(source: TensorSource, mapped: list, shapes: dict, dtype: torch.dtype | None):
    planned = []
    for item in mapped:
        info = source.info(item.source)
        target_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        shape = (info.shape[0] // item.num_chunks, *info.shape[1:]) if info.shape else ()
        if shape != shapes[item.target]:
            raise ValueError(f"{item.source} has shape {info.shape}; {item.target} needs {shapes[item.target]}")
        planned.append(
            PlannedTensor(item.target, shape, target_dtype, lambda item=item: item.take(source.get(item.source)))
        )
    return planned


#: a conversion's temporary folder next to its destination: `.<name>.<host>.<pid>.<random>.tmp` (host and pid tell
#: whether its converter is still running, so that a later run can sweep what a killed one left)
_TEMP_FOLDER = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def check_destination(dst: Path) -> None:
    """A destination the converter can fill: a missing or empty folder whose parent can be created. A file, a
    non-empty folder or a parent that is a file raise one-line `FileExistsError` / `NotADirectoryError`."""
    if dst.is_file() or (dst.exists() and not dst.is_dir()):
        raise FileExistsError(f"{dst} is a file; give a folder (it is created when missing)")
    if dst.is_dir() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")
    parent = next((p for p in dst.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise NotADirectoryError(f"{parent} is a file, so {dst} cannot be created")


def sweep_stale_conversions(dst: Path) -> list[Path]:
    """Remove the temporary folders that killed conversions (SIGKILL, a power cut: no clean-up could run) left next
    to `dst`: only names of the converter's own pattern, written on this host by a process that is gone."""
    removed = []
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        match = _TEMP_FOLDER.match(entry.name)
        if match and match["host"] == host and not pid_alive(int(match["pid"])) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            print(f"[convert] removed {entry.name}, left by a conversion that was killed", file=sys.stderr)
    return removed


@contextlib.contextmanager
def temporary_folder(dst: Path):
    """A new hidden folder next to `dst` for the output to be written into, removed on any failure, Ctrl-C or
    SIGTERM (main thread); folders left by earlier killed conversions are swept first."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_conversions(dst)
    with sigterm_as_exit():
        for _ in range(100):
            tmp = dst.parent / f".{dst.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                tmp.mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"no free temporary name next to {dst}")
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def convert_transformer(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    variant: str,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> dict:
    """Convert an original transformer folder (`config.json` + weights) into a `from_pretrained` folder.

    Streams: shapes come from the file headers, each tensor is read, renamed, cast and written on its own (peak
    memory: the largest tensor plus a constant), with a progress bar.

    Args:
        src: original folder; extension/avatar in Wan-native keys, reference in diffusers keys.
        dst: output folder (created); gets `config.json`, `diffusion_pytorch_model*.safetensors` (+ index).
        variant: `"reference"`, `"extension"` (also shot switching) or `"avatar"`.
        dtype: cast floating tensors to this dtype; `None` keeps the checkpoint's.
        max_shard_size: largest shard, bytes or a string like `"5GB"`.

    Returns the written config. Raises `KeyError` naming missing/unexpected keys (nothing is left at `dst` then).
    """
    src, dst = Path(src), Path(dst)
    check_destination(dst)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found")
    config = convert_config(json.loads(config_path.read_text()), variant)

    source = TensorSource(src)
    mapped = map_keys(source.keys(), KEY_MAPS[VARIANT_LAYOUT[variant]])
    shapes = expected_state_shapes(SkyReelsV3Transformer3DModel, config)
    check_mapped_keys(mapped, set(shapes), str(src), variant)
    planned = _planned_tensors(source, mapped, shapes, dtype)

    check_destination(dst)
    # Write into a temporary sibling folder and move it into place at the end: no half-written output.
    with temporary_folder(dst) as tmp:
        write_safetensors_shards(
            tmp, planned, "diffusion_pytorch_model", max_shard_size, description=f"transformer ({variant})"
        )
        full_config = {"_class_name": SkyReelsV3Transformer3DModel.__name__, **config}
        (tmp / "config.json").write_text(json.dumps(full_config, indent=2) + "\n")
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    return config


def write_t5(pth: Path, folder: Path, dtype: torch.dtype, max_shard_size: str = "5GB") -> None:
    """Stream the Wan-native UMT5-XXL encoder (`models_t5_umt5-xxl-enc-bf16.pth`) into a `UMT5EncoderModel` folder
    tensor by tensor (the 11 GB encoder never sits in memory); strict keys, config from the shapes."""
    from transformers import UMT5EncoderModel

    source = TensorSource(require_file(pth, "T5 checkpoint"))
    try:
        mapped = map_keys(source.keys(), T5_KEY_MAP)
    except KeyError as error:
        raise KeyError(f"T5 checkpoint {pth}: {error.args[0]}") from None
    planned = planned_tensors(source, mapped, dtype)
    config = t5_config({p.name: p.shape for p in planned})
    with torch.device("meta"):
        expected = set(UMT5EncoderModel(config).state_dict()) - {T5_TIED_KEY}
    check_keys(expected, {p.name for p in planned}, f"T5 checkpoint {pth}")
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    write_safetensors_shards(folder, planned, "model", max_shard_size, description="text_encoder (T5)")


def copy_text_encoder(src: Path, folder: Path, dtype: torch.dtype, max_shard_size: str = "5GB") -> None:
    """A transformers `UMT5EncoderModel` folder (the R2V repo's `text_encoder/`) re-sharded in `dtype`, streamed
    tensor by tensor; its keys must be exactly the model's."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config.from_pretrained(require_file(src, "text_encoder folder"))
    source = TensorSource(src)
    with torch.device("meta"):
        expected = set(UMT5EncoderModel(config).state_dict())
    keys = set(source.keys())
    if T5_TIED_KEY in keys and "shared.weight" in keys:
        keys.discard(T5_TIED_KEY)
    check_keys(expected - {T5_TIED_KEY} if T5_TIED_KEY not in keys else expected, keys, f"text_encoder folder {src}")
    mapped = map_keys(sorted(keys), [(r".*", r"\g<0>")])
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    write_safetensors_shards(
        folder, planned_tensors(source, mapped, dtype), "model", max_shard_size, description="text_encoder (UMT5)"
    )


@dataclass(frozen=True)
class StreamedComponent:
    """A component written straight to its folder by `write(folder)` (never loaded whole), as `library.cls`."""

    library: str
    cls: str
    write: Callable[[Path], None]


def _library_entry(component) -> list[str]:
    """`model_index.json` entry: [library, class]. diffusers resolves classes from outside diffusers/transformers
    through their defining module (what its own `save_pretrained` writes)."""
    if isinstance(component, StreamedComponent):
        return [component.library, component.cls]
    module = type(component).__module__
    library = module.split(".")[0]
    return [library if library in ("diffusers", "transformers") else module, type(component).__name__]


def _write_model_index(folder: Path, task: str, components: dict) -> None:
    import diffusers

    index = {"_class_name": TASKS[task].pipeline_class.__name__, "_diffusers_version": diffusers.__version__}
    for name, component in sorted(components.items()):
        index[name] = _library_entry(component)
    index["transformer"] = [SkyReelsV3Transformer3DModel.__module__, SkyReelsV3Transformer3DModel.__name__]
    (folder / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")


def _write_model_card(folder: Path, task: str, source: Path) -> None:
    cls = TASKS[task].pipeline_class.__name__
    card = f"""---
library_name: diffusers
pipeline_tag: text-to-video
tags: [skyreels-v3, video-generation, skyreels-diffusers]
---

# SkyReels-V3 {task.replace("_", " ")} (diffusers layout)

Converted from the original SkyReels-V3 checkpoint (`{source.name}`) with `scripts/convert_checkpoints.py` of
[skyreels-diffusers](https://pypi.org/project/skyreels-diffusers/). Weights are unchanged; only names and layout.

```python
import torch
import skyreels_diffusers
from skyreels_diffusers import {cls}

pipe = {cls}.from_pretrained("<this folder or repo>", torch_dtype=torch.bfloat16)
pipe.vae.to(torch.float32)
pipe.enable_model_cpu_offload()
```

Command line: `skyreels-v3 generate --task {task} --model <this folder> ...`
"""
    (folder / "README.md").write_text(card)


def _save_components(
    folder: Path,
    task: str,
    transformer_src: Path,
    components: dict,
    dtype: torch.dtype,
    max_shard_size: str,
    source: Path,
) -> None:
    """Write one pipeline folder: the transformer converted from `transformer_src`, the other components re-saved,
    the task's scheduler, `model_index.json` and a model card."""
    folder.mkdir(parents=True)
    convert_transformer(
        transformer_src, folder / "transformer", TASKS[task].variant, dtype=dtype, max_shard_size=max_shard_size
    )
    components = {**components, "scheduler": TASKS[task].make_scheduler()}
    for name, component in components.items():
        print(f"[convert] {folder.name}/{name}", file=sys.stderr)
        if isinstance(component, StreamedComponent):
            component.write(folder / name)
            continue
        kwargs = {"max_shard_size": max_shard_size} if hasattr(component, "num_parameters") else {}
        component.save_pretrained(folder / name, **kwargs)
    _write_model_index(folder, task, components)
    _write_model_card(folder, task, source)


def _repo_components(repo: str, src: Path, dtype: torch.dtype, max_shard_size: str) -> dict:
    """Every component but the transformer and the scheduler, where the repository's layout (`REPO_LAYOUTS`) keeps
    them: transformers / diffusers folders are re-saved, Wan-native `.pth` files converted; the text encoder streams
    tensor by tensor."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer

    layout = REPO_LAYOUTS[repo]
    text_encoder = src / layout.text_encoder
    if text_encoder.suffix == ".pth":
        write = partial(write_t5, require_file(text_encoder, "T5 checkpoint"), dtype=dtype)
    else:
        write = partial(copy_text_encoder, require_file(text_encoder, "text_encoder folder"), dtype=dtype)
    vae = src / layout.vae
    components = {
        "tokenizer": AutoTokenizer.from_pretrained(require_file(src / layout.tokenizer, "tokenizer folder")),
        "text_encoder": StreamedComponent(
            "transformers", "UMT5EncoderModel", partial(write, max_shard_size=max_shard_size)
        ),
        "vae": convert_wan_vae(vae)
        if vae.suffix == ".pth"
        else AutoencoderKLWan.from_pretrained(require_file(vae, "vae folder"), torch_dtype=torch.float32),
    }
    if layout.image_encoder is not None:
        components["image_encoder"] = convert_clip(src / layout.image_encoder, dtype)
    if layout.audio_encoder is not None:
        components["audio_encoder"], components["feature_extractor"] = load_wav2vec2(src / layout.audio_encoder)
    return components


def _transformer_source(src: Path, folder: str) -> Path:
    """The original transformer folder of a task (its `config.json` checked before any component is converted)."""
    path = src if folder == "." else require_file(src / folder, f"{folder} folder")
    require_file(path / "config.json", f"transformer config ({folder}/config.json)")
    return path


def convert_repo(
    task: str,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "5GB",
    push_to_hub: str | None = None,
) -> list[Path]:
    """Convert an original repo folder; returns the pipeline folders written (one, or two for video_extension).

    With `push_to_hub="user/name"` each pipeline folder is uploaded (two folders go to `user/name` under their
    folder names). The transformer and text encoder are stored in `dtype`, the VAE in float32.
    """
    if task not in REPOS:
        raise ValueError(f"--task must be one of {tuple(REPOS)}, got {task!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source repo not found: {src}")
    check_destination(dst)
    with temporary_folder(dst) as tmp:
        sources = {name: _transformer_source(src, TASKS[name].transformer_folder) for name in REPOS[task]}
        components = _repo_components(task, src, dtype, max_shard_size)
        outputs = {}
        for name, transformer_src in sources.items():  # one pipeline folder per task the repo holds
            single = len(REPOS[task]) == 1
            _save_components(
                tmp / ("pipeline" if single else name), name, transformer_src, components, dtype, max_shard_size, src
            )
            outputs["pipeline" if single else name] = dst if single else dst / name
        if dst.exists():
            dst.rmdir()
        if "pipeline" in outputs:
            os.replace(tmp / "pipeline", dst)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dst)
    folders = list(outputs.values())
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True)
        for folder in folders:
            api.upload_folder(
                repo_id=push_to_hub,
                folder_path=str(folder),
                path_in_repo=None if len(folders) == 1 else folder.name,
                commit_message=f"Add SkyReels-V3 {folder.name} (converted with skyreels-diffusers)",
            )
    return folders
