"""LoRA through diffusers' Wan loader: save, load into a pipeline, scale, and the Wan-native key format."""

from __future__ import annotations

import pytest
import torch


peft = pytest.importorskip("peft", reason="LoRA needs peft")

from skyreels_diffusers.app.tiny import tiny_pipeline  # noqa: E402
from tests.helpers import random_image  # noqa: E402


ARGS = dict(prompt="a cat", num_frames=5, height=32, width=48, num_inference_steps=2, output_type="latent")


def run(pipe, **kwargs):
    return pipe(ref_images=[random_image()], generator=torch.Generator().manual_seed(0), **ARGS, **kwargs).frames


def lora_state(transformer):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    state = get_peft_model_state_dict(transformer)
    transformer.delete_adapters("default")
    return state


def test_lora_save_load_and_scale(tmp_path):
    pipe = tiny_pipeline("reference_to_video")
    pipe.set_progress_bar_config(disable=True)
    base = run(pipe)
    state = lora_state(pipe.transformer)
    type(pipe).save_lora_weights(tmp_path, transformer_lora_layers=state)

    loaded = tiny_pipeline("reference_to_video")
    loaded.set_progress_bar_config(disable=True)
    loaded.load_lora_weights(tmp_path, adapter_name="style")
    with_lora = run(loaded)
    assert (with_lora - base).abs().max() > 1e-4  # the LoRA changes the result
    torch.testing.assert_close(run(loaded, attention_kwargs={"scale": 0.0}), base, atol=1e-5, rtol=1e-5)
    loaded.fuse_lora()
    torch.testing.assert_close(run(loaded), with_lora, atol=1e-4, rtol=1e-4)


def test_wan_native_lora_keys_load(tmp_path):
    """A LoRA saved with Wan's own names (`diffusion_model.blocks.N.self_attn.q.lora_A...`) maps onto our
    `attn1.to_q` through diffusers' Wan converter."""
    from safetensors.torch import save_file

    pipe = tiny_pipeline("reference_to_video")
    pipe.set_progress_bar_config(disable=True)
    base = run(pipe)
    dim = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    g = torch.Generator().manual_seed(1)
    native = {}
    for block in range(pipe.transformer.config.num_layers):
        for name in ("q", "k", "v", "o"):
            prefix = f"diffusion_model.blocks.{block}.self_attn.{name}"
            native[f"{prefix}.lora_A.weight"] = torch.randn(4, dim, generator=g) * 0.3
            native[f"{prefix}.lora_B.weight"] = torch.randn(dim, 4, generator=g) * 0.3
    save_file(native, str(tmp_path / "wan_lora.safetensors"))
    pipe.load_lora_weights(tmp_path, weight_name="wan_lora.safetensors")
    lora_layers = [n for n, _ in pipe.transformer.named_modules() if n.endswith("attn1.to_q.lora_A")]
    assert len(lora_layers) == pipe.transformer.config.num_layers
    assert (run(pipe) - base).abs().max() > 1e-4
