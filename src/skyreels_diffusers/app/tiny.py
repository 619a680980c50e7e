"""Tiny, randomly initialised components (toy sizes of the real classes): what `--model tiny`, the tests and the web
app build their pipelines from (`tasks.tiny_pipeline`).

They have the real components' classes and code paths (UMT5 encoder + tokenizer, Wan VAE, SkyReels-V3 transformer,
CLIP, wav2vec2), build offline in about a second and run on a CPU. Their output is noise-like: RANDOM WEIGHTS, for
trying the tools, not for looking at.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import AutoencoderKLWan

from ..models import SkyReelsV3Transformer3DModel
from ..models.configs import TINY_TRANSFORMER_CONFIGS


TINY_VAE_CONFIG = dict(
    base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
)
TINY_TEXT_ENCODER_CONFIG = dict(
    vocab_size=260,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
TINY_CLIP_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=224,
    patch_size=14,
    projection_dim=32,
    hidden_act="gelu",
)
#: the golden wav2vec2 case's configuration (standard CNN strides: 320 samples per feature at 16 kHz)
TINY_WAV2VEC2_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    conv_dim=[16] * 7,
    conv_kernel=[10, 3, 3, 3, 3, 2, 2],
    conv_stride=[5, 2, 2, 2, 2, 2, 2],
    conv_bias=False,
    feat_extract_norm="group",
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    do_stable_layer_norm=False,
)
#: long side of the default output size of tiny pipelines when no resolution is asked for
TINY_LONG_SIDE = 256


def tiny_tokenizer():
    """A byte-level tokenizer built offline (pad 0, eos 1, unk 2, then the 256 bytes), appending `</s>` like UMT5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for char in sorted(byte_alphabet):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def tiny_text_encoder(seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(**TINY_TEXT_ENCODER_CONFIG)).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(**TINY_VAE_CONFIG).eval()


def tiny_transformer(variant: str, seed: int = 0) -> SkyReelsV3Transformer3DModel:
    torch.manual_seed(seed)
    return SkyReelsV3Transformer3DModel(**TINY_TRANSFORMER_CONFIGS[variant]).eval()


def avatar_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    )


def tiny_avatar_encoders(seed: int = 0) -> dict:
    """The talking avatar's CLIP image encoder, wav2vec2 audio encoder and feature extractor at toy sizes."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(seed)
    return {
        "image_encoder": CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_CONFIG)).eval(),
        "audio_encoder": Wav2Vec2Model(Wav2Vec2Config(**TINY_WAV2VEC2_CONFIG)).eval(),
        "feature_extractor": avatar_feature_extractor(),
    }


def tiny_components(task: str, seed: int = 0) -> dict:
    """A task's components at toy sizes (random weights, CPU, float32), from the task registry's spec."""
    from .tasks import get_task

    spec = get_task(task)
    components = {
        "tokenizer": tiny_tokenizer(),
        "text_encoder": tiny_text_encoder(seed),
        "transformer": tiny_transformer(spec.variant, seed),
        "vae": tiny_vae(seed),
        "scheduler": spec.make_scheduler(),
    }
    wanted = inspect.signature(spec.pipeline_class.__init__).parameters
    if "audio_encoder" in wanted:  # the pipeline takes the avatar's image and audio encoders
        components.update(tiny_avatar_encoders(seed))
    return components


def tiny_pipeline(task: str, seed: int = 0):
    """A tiny randomly initialised pipeline for `task` (float32, CPU)."""
    from .tasks import get_task

    return get_task(task).pipeline_class(**tiny_components(task, seed))
