"""Run the ORIGINAL SkyReels-V3 transformers beside ours, for benchmarks (`bench_transformer.py --original PATH`).

PATH is a checkout of SkyworkAI/SkyReels-V3 (its `skyreels_v3/` folder is read from there; nothing of it is in this
repository). Only the transformer modules are imported: the package `__init__` files (which pull in pipelines,
xfuser, kornia, ...) are bypassed with namespace stubs, xfuser's `get_sp_group` is stubbed (never called without
`--use_usp`), and FlashAttention, which the avatar model calls directly, is replaced by PyTorch SDPA with the same
semantics ([B, L, H, D], scale 1/sqrt(d), no mask; q/k/v cast to bf16 like the original) when flash-attn is absent.

The original model is built with random weights; its state dict, mapped to our names with the project's own
conversion tables, loads into `SkyReelsV3Transformer3DModel` strictly, so both run the same weights.
"""

from __future__ import annotations

import importlib
import sys
import types
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F


def _stub(name: str, **attributes) -> types.ModuleType:
    module = sys.modules.get(name) or types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    sys.modules[name] = module
    return module


def sdpa_flash_attention(
    q,
    k,
    v,
    q_lens=None,
    k_lens=None,
    dropout_p=0.0,
    softmax_scale=None,
    q_scale=None,
    causal=False,
    window_size=(-1, -1),
    deterministic=False,
    dtype=torch.bfloat16,
    version=None,
):
    """FlashAttention's call on `[B, L, H, D]` tensors through SDPA (the original ignores the lengths as well)."""
    half = (torch.float16, torch.bfloat16)
    if q.dtype not in half:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    q, k = q.to(v.dtype), k.to(v.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale
    )
    return out.transpose(1, 2)


def import_original(root: str | Path) -> dict[str, types.ModuleType]:
    """The three original transformer modules, imported from `root/skyreels_v3` without the package inits."""
    root = Path(root).resolve()
    package = root / "skyreels_v3"
    if not (package / "modules" / "transformer.py").is_file():
        raise FileNotFoundError(f"{root} is not a SkyReels-V3 checkout (no skyreels_v3/modules/transformer.py)")
    for name, path in (
        ("skyreels_v3", package),
        ("skyreels_v3.modules", package / "modules"),
        ("skyreels_v3.utils", package / "utils"),
        ("skyreels_v3.modules.reference_to_video", package / "modules" / "reference_to_video"),
    ):
        _stub(name, __path__=[str(path)])

    def no_sequence_parallel(*args, **kwargs):
        raise RuntimeError("xfuser sequence parallelism is not used by the benchmark")

    _stub("xfuser")
    _stub("xfuser.core")
    _stub("xfuser.core.distributed", get_sp_group=no_sequence_parallel)
    try:
        import kornia  # noqa: F401
    except ImportError:
        _stub("kornia")
    attention = importlib.import_module("skyreels_v3.modules.attention")
    if not getattr(attention, "FLASH_ATTN_2_AVAILABLE", False) and not getattr(
        attention, "FLASH_ATTN_3_AVAILABLE", False
    ):
        attention.flash_attention = sdpa_flash_attention
    modules = {
        "extension": importlib.import_module("skyreels_v3.modules.transformer"),
        "avatar": importlib.import_module("skyreels_v3.modules.transformer_a2v"),
        "reference": importlib.import_module("skyreels_v3.modules.reference_to_video.transformer"),
    }
    if attention.flash_attention is sdpa_flash_attention:
        for module in (modules["extension"], modules["avatar"]):
            if hasattr(module, "flash_attention"):
                module.flash_attention = sdpa_flash_attention
    return modules


def original_config(variant: str, ours: dict) -> dict:
    """Our config -> the original constructor's arguments."""
    if variant == "reference":
        keys = (
            "patch_size",
            "num_attention_heads",
            "attention_head_dim",
            "in_channels",
            "out_channels",
            "text_dim",
            "freq_dim",
            "ffn_dim",
            "num_layers",
            "cross_attn_norm",
            "qk_norm",
            "eps",
        )
        return {**{k: ours[k] for k in keys}, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024}
    config = dict(
        model_type="i2v" if variant == "avatar" else "t2v",
        patch_size=tuple(ours["patch_size"]),
        text_len=512,
        in_dim=ours["in_channels"],
        dim=ours["num_attention_heads"] * ours["attention_head_dim"],
        ffn_dim=ours["ffn_dim"],
        freq_dim=ours["freq_dim"],
        text_dim=ours["text_dim"],
        out_dim=ours["out_channels"],
        num_heads=ours["num_attention_heads"],
        num_layers=ours["num_layers"],
        window_size=(-1, -1),
        qk_norm=True,
        cross_attn_norm=ours["cross_attn_norm"],
        eps=ours["eps"],
    )
    if variant == "avatar":
        config.update(
            audio_window=ours["audio_window"],
            intermediate_dim=ours["audio_intermediate_dim"],
            output_dim=ours["audio_dim"],
            context_tokens=ours["audio_context_tokens"],
            vae_scale=ours["audio_vae_scale"],
            norm_input_visual=ours["audio_norm_input"],
            norm_output_audio=ours["audio_norm_output"],
        )
    return config


def build_original(modules: dict, variant: str, ours: dict, device, dtype=torch.bfloat16, seed: int = 0):
    """The original model with random weights on `device`, in the dtype its pipeline runs it."""
    torch.manual_seed(seed)
    cls = {
        "extension": modules["extension"].WanModel,
        "avatar": modules["avatar"].WanModel,
        "reference": modules["reference"].SkyReelsA2WanI2v3DModel,
    }[variant]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**original_config(variant, ours))
    finally:
        torch.set_default_dtype(previous)
    for param in model.parameters():  # a random, non-degenerate state (the original zero-inits its head)
        if param.dim() >= 2 and param.abs().sum() == 0:
            torch.nn.init.normal_(param, std=param.shape[-1] ** -0.5)
    return model.to(dtype).eval().requires_grad_(False)


def our_state_dict(original, variant: str) -> dict[str, torch.Tensor]:
    from skyreels_diffusers.loaders.transformer_conversion import KEY_MAPS, VARIANT_LAYOUT, rename_state_dict

    return rename_state_dict(original.state_dict(), KEY_MAPS[VARIANT_LAYOUT[variant]], f"original {variant}")


def call_original(model, variant: str, inputs: dict) -> torch.Tensor:
    """One forward with the original's conventions for `inputs` in our format (see bench_transformer.make_inputs)."""
    x, t, context = inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"]
    if variant == "reference":
        dtype = next(model.parameters()).dtype
        return model(
            hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=context.to(dtype), return_dict=False
        )[0]
    if variant == "extension":
        cuda = x.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
            return model(x, t=t, context=context)
    latents, y = x[:, :16], x[:, 16:]
    frames, height, width = latents.shape[2:]
    seq_len = frames * (height // 2) * (width // 2)
    dtype = context.dtype
    out = model(
        [latents[0]],
        t=t.float(),
        context=[context[0]],
        seq_len=seq_len,
        clip_fea=inputs["encoder_hidden_states_image"].to(dtype),
        y=y.to(dtype),
        audio=inputs["audio_embeds"].to(dtype),
        ref_target_masks=torch.ones(3, height, width, device=x.device),
    )
    return out
