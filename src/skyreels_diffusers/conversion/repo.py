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

Each pipeline folder gets a `model_index.json` naming our classes and a model card. The transformer and the 11 GB
text encoder stream tensor by tensor (`tensor_io`: peak memory the largest tensor plus a constant, a progress bar
each); the small components (VAE, CLIP, wav2vec2) load whole. `.pth` files are read with only tensor-rebuilding
globals allowed (`weights_only=True` or `tensor_io`'s restricted unpickler). Output appears atomically (temporary
folder, renamed at the end).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..pipelines.tasks import REPOS, TASKS
from .tensor_io import PlannedTensor, TensorSource, write_safetensors_shards
from .transformer import KeyMap, convert_transformer, map_keys, rename_state_dict


# Wan-native UMT5 encoder (`models_t5_umt5-xxl-enc-bf16.pth`) -> transformers `UMT5EncoderModel`
T5_KEY_MAP: KeyMap = [
    (r"token_embedding\.weight", r"shared.weight"),
    (r"blocks\.(\d+)\.norm1\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"blocks\.(\d+)\.attn\.(q|k|v|o)\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (
        r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
        r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    (r"blocks\.(\d+)\.norm2\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"blocks\.(\d+)\.ffn\.fc1\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"blocks\.(\d+)\.ffn\.fc2\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (r"norm\.weight", r"encoder.final_layer_norm.weight"),
]


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _t5_config(shapes: dict[str, tuple[int, ...]]):
    """`UMT5Config` of a converted Wan-native T5 encoder, read off its tensor shapes."""
    from transformers import UMT5Config

    layers = len({k.split(".")[2] for k in shapes if k.startswith("encoder.block.")})
    vocab, d_model = shapes["shared.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        num_heads=heads,
        num_layers=layers,
        d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


_T5_TIED = "encoder.embed_tokens.weight"  # the same tensor as `shared.weight`; transformers saves only the latter


def _check_keys(expected: set[str], produced: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - produced), sorted(produced - expected)
    if missing or unexpected:
        raise KeyError(f"{what}: missing keys {missing}, unexpected keys {unexpected}")


def convert_t5(pth: Path, dtype: torch.dtype):
    """Wan-native UMT5-XXL encoder checkpoint -> `UMT5EncoderModel` in memory (config read off the tensor shapes).
    One call for users who want the encoder from the original file; `write_t5` streams it to a folder instead."""
    from transformers import UMT5EncoderModel

    converted = rename_state_dict(_load_pth(_require(pth, "T5 checkpoint")), T5_KEY_MAP, f"T5 checkpoint {pth}")
    config = _t5_config({k: tuple(v.shape) for k, v in converted.items()})
    converted[_T5_TIED] = converted["shared.weight"]
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    _check_keys(set(model.state_dict()), set(converted), f"T5 checkpoint {pth}")
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    return model.eval()


def _planned(source: TensorSource, mapped, dtype: torch.dtype) -> list[PlannedTensor]:
    planned = []
    for item in mapped:
        info = source.info(item.source)
        shape = (info.shape[0] // item.num_chunks, *info.shape[1:])
        planned.append(
            PlannedTensor(
                item.target,
                shape,
                dtype if info.dtype.is_floating_point else info.dtype,
                lambda item=item: item.take(source.get(item.source)),
            )
        )
    return planned


def write_t5(pth: Path, folder: Path, dtype: torch.dtype, max_shard_size: str = "5GB") -> None:
    """Stream the Wan-native UMT5-XXL encoder (`models_t5_umt5-xxl-enc-bf16.pth`) into a `UMT5EncoderModel` folder
    tensor by tensor (the 11 GB encoder never sits in memory); strict keys, config from the shapes."""
    from transformers import UMT5EncoderModel

    source = TensorSource(_require(pth, "T5 checkpoint"))
    try:
        mapped = map_keys(source.keys(), T5_KEY_MAP)
    except KeyError as error:
        raise KeyError(f"T5 checkpoint {pth}: {error.args[0]}") from None
    planned = _planned(source, mapped, dtype)
    config = _t5_config({p.name: p.shape for p in planned})
    with torch.device("meta"):
        expected = set(UMT5EncoderModel(config).state_dict()) - {_T5_TIED}
    _check_keys(expected, {p.name for p in planned}, f"T5 checkpoint {pth}")
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    write_safetensors_shards(folder, planned, "model", max_shard_size, description="text_encoder (T5)")


def copy_text_encoder(src: Path, folder: Path, dtype: torch.dtype, max_shard_size: str = "5GB") -> None:
    """A transformers `UMT5EncoderModel` folder (the R2V repo's `text_encoder/`) re-sharded in `dtype`, streamed
    tensor by tensor; its keys must be exactly the model's."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config.from_pretrained(_require(src, "text_encoder folder"))
    source = TensorSource(src)
    with torch.device("meta"):
        expected = set(UMT5EncoderModel(config).state_dict())
    keys = set(source.keys())
    if _T5_TIED in keys and "shared.weight" in keys:
        keys.discard(_T5_TIED)
    _check_keys(expected - {_T5_TIED} if _T5_TIED not in keys else expected, keys, f"text_encoder folder {src}")
    mapped = map_keys(sorted(keys), [(r".*", r"\g<0>")])
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    write_safetensors_shards(
        folder, _planned(source, mapped, dtype), "model", max_shard_size, description="text_encoder (UMT5)"
    )


def convert_wan_vae(pth: Path):
    """`Wan2.1_VAE.pth` -> `AutoencoderKLWan` (Wan2.1 architecture; base width and latent channels read off the
    tensors), float32, strict."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    original = _load_pth(_require(pth, "VAE checkpoint"))
    converted = convert_wan_vae_to_diffusers(original)
    config = dict(
        base_dim=converted["encoder.conv_in.weight"].shape[0],
        z_dim=converted["post_quant_conv.weight"].shape[0],
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    )
    with torch.device("meta"):
        vae = AutoencoderKLWan(**config)
    missing = sorted(set(vae.state_dict()) - set(converted))
    unexpected = sorted(set(converted) - set(vae.state_dict()))
    if missing or unexpected:
        raise KeyError(f"VAE checkpoint {pth}: missing keys {missing}, unexpected keys {unexpected}")
    vae.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True, assign=True)
    return vae.eval()


# open-clip XLM-RoBERTa ViT-H/14 visual tower -> transformers CLIPVisionModel (the text tower is not used)
CLIP_KEY_MAP: KeyMap = [
    (r"visual\.patch_embedding\.weight", r"vision_model.embeddings.patch_embedding.weight"),
    (r"visual\.cls_embedding", r"vision_model.embeddings.class_embedding"),
    (r"visual\.pos_embedding", r"vision_model.embeddings.position_embedding.weight"),
    (r"visual\.pre_norm\.(weight|bias)", r"vision_model.pre_layrnorm.\1"),
    (r"visual\.post_norm\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"visual\.transformer\.(\d+)\.norm1\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm1.\2"),
    (r"visual\.transformer\.(\d+)\.norm2\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm2.\2"),
    (
        r"visual\.transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)",
        tuple(rf"vision_model.encoder.layers.\1.self_attn.{p}_proj.\2" for p in "qkv"),
    ),
    (
        r"visual\.transformer\.(\d+)\.attn\.proj\.(weight|bias)",
        r"vision_model.encoder.layers.\1.self_attn.out_proj.\2",
    ),
    (r"visual\.transformer\.(\d+)\.mlp\.0\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.fc1.\2"),
    (r"visual\.transformer\.(\d+)\.mlp\.2\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.fc2.\2"),
    (r"visual\.head", None),  # projection to the joint space: not part of the penultimate-layer features
    (r"textual\..*", None),
    (r"log_scale", None),
]
CLIP_HEAD_DIM = 80  # ViT-H/14: 1280 wide, 16 heads


def convert_clip(pth: Path, dtype: torch.dtype):
    """open-clip `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` -> `CLIPVisionModel` (visual tower;
    exact GELU, LayerNorm eps 1e-5, heads of 80 channels; sizes read off the tensors)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    converted = rename_state_dict(_load_pth(_require(pth, "CLIP checkpoint")), CLIP_KEY_MAP, f"CLIP checkpoint {pth}")
    embeddings = "vision_model.embeddings."
    converted[embeddings + "class_embedding"] = converted[embeddings + "class_embedding"].reshape(-1)
    converted[embeddings + "position_embedding.weight"] = converted[embeddings + "position_embedding.weight"][0]
    hidden, _, patch, _ = converted[embeddings + "patch_embedding.weight"].shape
    tokens = converted[embeddings + "position_embedding.weight"].shape[0]
    config = CLIPVisionConfig(
        hidden_size=hidden,
        num_attention_heads=max(1, hidden // CLIP_HEAD_DIM),
        intermediate_size=converted["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len({k.split(".")[3] for k in converted if ".encoder.layers." in k}),
        patch_size=patch,
        image_size=int(round((tokens - 1) ** 0.5)) * patch,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=hidden,
    )
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    expected = set(model.state_dict())
    if not any(k.startswith("vision_model.") for k in expected):  # transformers 5 flattens the vision tower
        converted = {k.removeprefix("vision_model."): v for k, v in converted.items()}
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise KeyError(f"CLIP checkpoint {pth}: missing keys {missing}, unexpected keys {unexpected}")
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    # the position ids are a non-persistent buffer (not in the state dict): built on the meta device, give them values
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            if not name.endswith("position_ids"):
                raise RuntimeError(f"CLIP checkpoint {pth}: buffer {name} was left uninitialised")
            module_name, _, attribute = name.rpartition(".")
            module = model.get_submodule(module_name)
            module.register_buffer(attribute, torch.arange(tokens)[None], persistent=False)
    return model.eval()


def load_wav2vec2(folder: Path):
    """The repo's wav2vec2 folder (`chinese-wav2vec2-base`): `Wav2Vec2Model` (float32, strict: no encoder weight
    may be missing; pre-training heads are dropped) and its feature extractor."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    _require(folder, "wav2vec2 folder")
    model, info = Wav2Vec2Model.from_pretrained(folder, torch_dtype=torch.float32, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("masked_spec_embed")]
    if missing:
        raise KeyError(f"wav2vec2 folder {folder} is missing weights: {sorted(missing)}")
    return model.eval(), Wav2Vec2FeatureExtractor.from_pretrained(folder)


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

    from ..models import SkyReelsV3Transformer3DModel

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


def _repo_components(task: str, src: Path, dtype: torch.dtype, max_shard_size: str) -> dict:
    """Every component but the transformer and the scheduler, from the repo's layout (diffusers layout for the
    reference repo, Wan-native files for the others); the text encoders stream tensor by tensor."""
    from transformers import AutoTokenizer

    if task == "reference_to_video":
        from diffusers import AutoencoderKLWan

        write = partial(
            copy_text_encoder,
            _require(src / "text_encoder", "text_encoder folder"),
            dtype=dtype,
            max_shard_size=max_shard_size,
        )
        return {
            "tokenizer": AutoTokenizer.from_pretrained(_require(src / "tokenizer", "tokenizer folder")),
            "text_encoder": StreamedComponent("transformers", "UMT5EncoderModel", write),
            "vae": AutoencoderKLWan.from_pretrained(_require(src / "vae", "vae folder"), torch_dtype=torch.float32),
        }
    write = partial(
        write_t5,
        _require(src / "models_t5_umt5-xxl-enc-bf16.pth", "T5 checkpoint"),
        dtype=dtype,
        max_shard_size=max_shard_size,
    )
    components = {
        "tokenizer": AutoTokenizer.from_pretrained(_require(src / "google" / "umt5-xxl", "tokenizer folder")),
        "text_encoder": StreamedComponent("transformers", "UMT5EncoderModel", write),
        "vae": convert_wan_vae(src / "Wan2.1_VAE.pth"),
    }
    if task == "talking_avatar":
        audio_encoder, feature_extractor = load_wav2vec2(src / "chinese-wav2vec2-base")
        components.update(
            image_encoder=convert_clip(src / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", dtype),
            audio_encoder=audio_encoder,
            feature_extractor=feature_extractor,
        )
        _require(src / "config.json", "avatar transformer config")
    return components


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
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        components = _repo_components(task, src, dtype, max_shard_size)
        outputs = {}
        for name in REPOS[task]:  # one pipeline folder per task the repo holds
            folder = TASKS[name].transformer_folder
            transformer_src = src if folder == "." else _require(src / folder, f"{folder} folder")
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
