"""The original repositories' other components from their own files: the Wan-native UMT5-XXL text encoder, the
Wan2.1 VAE, the open-clip ViT-H/14 image tower and the wav2vec2 folder, each into its diffusers / transformers
class, strictly (every key accounted for) and with the configuration read off the tensor shapes.

`.pth` files are read with only tensor-rebuilding globals allowed (`weights_only=True`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tensor_io import PlannedTensor, TensorSource
from .transformer_conversion import KeyMap, rename_state_dict


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


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def t5_config(shapes: dict[str, tuple[int, ...]]):
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


T5_TIED_KEY = "encoder.embed_tokens.weight"  # the same tensor as `shared.weight`; transformers saves only the latter


def check_keys(expected: set[str], produced: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - produced), sorted(produced - expected)
    if missing or unexpected:
        raise KeyError(f"{what}: missing keys {missing}, unexpected keys {unexpected}")


def convert_t5(pth: Path, dtype: torch.dtype):
    """Wan-native UMT5-XXL encoder checkpoint -> `UMT5EncoderModel` in memory (config read off the tensor shapes).
    One call for users who want the encoder from the original file; `write_t5` streams it to a folder instead."""
    from transformers import UMT5EncoderModel

    converted = rename_state_dict(load_pth(require_file(pth, "T5 checkpoint")), T5_KEY_MAP, f"T5 checkpoint {pth}")
    config = t5_config({k: tuple(v.shape) for k, v in converted.items()})
    converted[T5_TIED_KEY] = converted["shared.weight"]
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    check_keys(set(model.state_dict()), set(converted), f"T5 checkpoint {pth}")
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    return model.eval()


def planned_tensors(source: TensorSource, mapped, dtype: torch.dtype) -> list[PlannedTensor]:
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


def build_wan_vae(converted: dict, what: str, dtype: torch.dtype = torch.float32, config=None):
    """diffusers-named Wan2.1 VAE tensors -> `AutoencoderKLWan` (base width and latent channels read off the tensors
    unless `config`: a dict of `AutoencoderKLWan` arguments or a folder / `config.json`), strict."""
    from diffusers import AutoencoderKLWan

    if config is None:
        config = dict(
            base_dim=converted["encoder.conv_in.weight"].shape[0],
            z_dim=converted["post_quant_conv.weight"].shape[0],
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=2,
            attn_scales=[],
            temperal_downsample=[False, True, True],
        )
    elif not isinstance(config, dict):
        config = AutoencoderKLWan.load_config(config)
    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(config)
    missing = sorted(set(vae.state_dict()) - set(converted))
    unexpected = sorted(set(converted) - set(vae.state_dict()))
    if missing or unexpected:
        raise KeyError(f"{what}: missing keys {missing}, unexpected keys {unexpected}")
    wrong = {k: tuple(v.shape) for k, v in converted.items() if tuple(v.shape) != tuple(vae.state_dict()[k].shape)}
    if wrong:
        raise ValueError(f"{what}: tensors of the wrong shape for the Wan VAE: {wrong}")
    vae.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    return vae.eval()


def convert_wan_vae(pth: Path):
    """`Wan2.1_VAE.pth` -> `AutoencoderKLWan` (Wan2.1 architecture; base width and latent channels read off the
    tensors), float32, strict."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    original = load_pth(require_file(pth, "VAE checkpoint"))
    return build_wan_vae(convert_wan_vae_to_diffusers(original), f"VAE checkpoint {pth}")


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
    what = f"CLIP checkpoint {pth}"
    converted = rename_state_dict(load_pth(require_file(pth, "CLIP checkpoint")), CLIP_KEY_MAP, what)
    return build_clip_vision(converted, dtype, what)


def clip_vision_config(converted: dict):
    """`CLIPVisionConfig` of a ViT-H/14-like tower read off its (transformers-named) tensors, heads of 80."""
    from transformers import CLIPVisionConfig

    embeddings = "vision_model.embeddings."
    hidden, _, patch, _ = converted[embeddings + "patch_embedding.weight"].shape
    tokens = converted[embeddings + "position_embedding.weight"].reshape(-1, hidden).shape[0]
    return CLIPVisionConfig(
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


def build_clip_vision(converted: dict, dtype: torch.dtype, what: str, config=None):
    """transformers-named CLIP vision tensors (`vision_model.*`) -> `CLIPVisionModel`, strict; the class and
    position embeddings are reshaped from the original / open-clip shapes; `config` read off the tensors if None."""
    from transformers import CLIPVisionModel

    config = config or clip_vision_config(converted)
    embeddings = "vision_model.embeddings."
    hidden = config.hidden_size
    converted[embeddings + "class_embedding"] = converted[embeddings + "class_embedding"].reshape(-1)
    converted[embeddings + "position_embedding.weight"] = converted[embeddings + "position_embedding.weight"].reshape(
        -1, hidden
    )
    tokens = converted[embeddings + "position_embedding.weight"].shape[0]
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    expected = set(model.state_dict())
    if not any(k.startswith("vision_model.") for k in expected):  # transformers 5 flattens the vision tower
        converted = {k.removeprefix("vision_model."): v for k, v in converted.items()}
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise KeyError(f"{what}: missing keys {missing}, unexpected keys {unexpected}")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = {k: (tuple(v.shape), shapes[k]) for k, v in converted.items() if tuple(v.shape) != shapes[k]}
    if wrong:
        raise ValueError(f"{what}: tensor shapes do not fit the CLIP vision model (got, expected): {wrong}")
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    # the position ids are a non-persistent buffer (not in the state dict): built on the meta device, give them values
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            if not name.endswith("position_ids"):
                raise RuntimeError(f"{what}: buffer {name} was left uninitialised")
            module_name, _, attribute = name.rpartition(".")
            module = model.get_submodule(module_name)
            module.register_buffer(attribute, torch.arange(tokens)[None], persistent=False)
    return model.eval()


def load_wav2vec2(folder: Path):
    """The repo's wav2vec2 folder (`chinese-wav2vec2-base`): `Wav2Vec2Model` (float32, strict: no encoder weight
    may be missing; pre-training heads are dropped) and its feature extractor."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    require_file(folder, "wav2vec2 folder")
    model, info = Wav2Vec2Model.from_pretrained(folder, torch_dtype=torch.float32, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("masked_spec_embed")]
    if missing:
        raise KeyError(f"wav2vec2 folder {folder} is missing weights: {sorted(missing)}")
    return model.eval(), Wav2Vec2FeatureExtractor.from_pretrained(folder)
