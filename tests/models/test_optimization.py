"""FP8 quantisation and memory presets on tiny models (CPU): they run and stay close to bf16."""

from __future__ import annotations

import pytest
import torch

from skyreels_diffusers import SkyReelsV3Transformer3DModel
from skyreels_diffusers.app.tiny import tiny_pipeline
from skyreels_diffusers.optimization import (
    apply_memory_mode,
    enable_fast_path,
    quantize_transformer,
    stream_large_components,
    streamed_modules,
    torchao_quantization_config,
)
from tests.helpers import tiny_inputs, tiny_transformer


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bf16_model(variant, tmp_path):
    tiny_transformer(variant).save_pretrained(tmp_path / variant)
    return SkyReelsV3Transformer3DModel.from_pretrained(tmp_path / variant, torch_dtype=torch.bfloat16)


@pytest.mark.parametrize("mode", ["fp8_weight_only", "fp8_storage"])
@pytest.mark.parametrize("variant", ["extension", "avatar"])
def test_fp8_transformer_runs_close_to_bf16(tmp_path, mode, variant):
    model = bf16_model(variant, tmp_path)
    inputs = tiny_inputs(model, variant)
    with torch.no_grad():
        reference = model(**inputs).sample
    quantize_transformer(model, mode)
    if mode == "fp8_weight_only":
        assert "Float8" in type(model.blocks[0].attn1.to_q.weight).__name__
        assert model.proj_out.weight.dtype == torch.bfloat16  # outside the blocks: not quantised
        assert model.blocks[0].scale_shift_table.dtype == torch.float32
    else:
        assert model.blocks[0].ffn.net[2].weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        out = model(**inputs).sample
    assert torch.isfinite(out).all()
    assert 0 < rel(out, reference) < 0.15


def test_torchao_config_at_from_pretrained(tmp_path):
    tiny_transformer("reference").save_pretrained(tmp_path / "m")
    plain = SkyReelsV3Transformer3DModel.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16)
    quantized = SkyReelsV3Transformer3DModel.from_pretrained(
        tmp_path / "m", torch_dtype=torch.bfloat16, quantization_config=torchao_quantization_config("fp8_weight_only")
    )
    assert "Float8" in type(quantized.blocks[1].ffn.net[0].proj.weight).__name__
    assert "Float8" not in type(quantized.proj_out.weight).__name__
    inputs = tiny_inputs(plain, "reference")
    with torch.no_grad():
        assert 0 < rel(quantized(**inputs).sample, plain(**inputs).sample) < 0.15


def test_pipeline_quantization_config(tmp_path):
    from diffusers import PipelineQuantizationConfig

    from skyreels_diffusers import SkyReelsV3ReferencePipeline

    tiny_pipeline("reference_to_video").save_pretrained(tmp_path / "p")
    config = PipelineQuantizationConfig(quant_mapping={"transformer": torchao_quantization_config("fp8_weight_only")})
    pipe = SkyReelsV3ReferencePipeline.from_pretrained(
        tmp_path / "p", dtype=torch.bfloat16, quantization_config=config
    )
    assert "Float8" in type(pipe.transformer.blocks[0].attn2.to_v.weight).__name__


def test_quantize_rejects_unknown_mode():
    with pytest.raises(ValueError, match="quantization mode"):
        quantize_transformer(tiny_transformer("reference"), "int3")
    with pytest.raises(ValueError, match="memory mode"):
        apply_memory_mode(tiny_pipeline("reference_to_video"), "cloud", "cpu")


@pytest.mark.parametrize("task", ["reference_to_video", pytest.param("talking_avatar", marks=pytest.mark.slow)])
def test_group_offload_streams_the_two_large_components(task):
    """`group` / `low_vram` put block-level offload hooks on the transformer blocks and on the text encoder's block
    stack (not on the whole UMT5 model, where diffusers would find no block list) and leave the small components
    alone; the output equals the resident pipeline's (CPU onload device: the hooks run without streams)."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    from tests.helpers import random_image

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        kwargs = dict(
            prompt="a cat",
            height=32,
            width=32,
            num_inference_steps=2,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        )
        if task == "talking_avatar":
            import numpy as np

            t = np.arange(16000) / 16000
            return pipe(
                image=random_image(32, 32),
                audio=(0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32),
                audio_sample_rate=16000,
                **kwargs,
            ).frames
        return pipe(ref_images=[random_image(32, 32)], num_frames=5, **kwargs).frames

    expected = run(tiny_pipeline(task))
    pipe = tiny_pipeline(task)
    stream_large_components(pipe, torch.device("cpu"), use_stream=False)
    streamed = streamed_modules(pipe)
    assert streamed["text_encoder"] is pipe.text_encoder.encoder
    assert _is_group_offload_enabled(pipe.transformer) and _is_group_offload_enabled(pipe.text_encoder.encoder)
    hooked = [
        n
        for n, m in pipe.transformer.named_modules()
        if getattr(m, "_diffusers_hook", None) is not None
        and m._diffusers_hook.get_hook("group_offloading") is not None
    ]
    assert "blocks.0" in hooked and len([n for n in hooked if n.startswith("blocks.")]) == len(pipe.transformer.blocks)
    assert not _is_group_offload_enabled(pipe.vae)
    torch.testing.assert_close(run(pipe), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    model = tiny_transformer("avatar")
    inputs = tiny_inputs(model, "avatar")
    with torch.no_grad():
        reference = model(**inputs).sample

    class Holder:
        transformer = model

    enable_fast_path(Holder, compile=True, attention_backend="native")
    with torch.no_grad():
        out = model(**inputs).sample
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", [pytest.param("first_block", marks=pytest.mark.slow), "mag"])
def test_step_caching_through_diffusers_hooks(kind):
    """diffusers' cache hooks find the SkyReels-V3 blocks (registered block class) and the pipelines' cache
    contexts: enabling a cache runs and changes the result (steps reuse cached residuals)."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig

    from tests.helpers import random_image

    pipe = tiny_pipeline("reference_to_video")
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        ref_images=[random_image()],
        prompt="a",
        num_frames=5,
        height=32,
        width=48,
        num_inference_steps=8,
        output_type="latent",
    )
    plain = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    config = (
        FirstBlockCacheConfig(threshold=0.2)
        if kind == "first_block"
        else MagCacheConfig(threshold=0.5, num_inference_steps=8, mag_ratios=[1.0] * 8)
    )
    pipe.transformer.enable_cache(config)
    cached = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert torch.isfinite(cached).all()
    assert 0 < rel(cached, plain) < 0.2
    pipe.transformer.disable_cache()
    again = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(again, plain, atol=1e-5, rtol=1e-5)
