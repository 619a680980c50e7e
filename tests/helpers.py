"""Shared test helpers: golden fixtures of the original code, tiny models from the package's own configs."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


FIXTURES = Path(__file__).parent / "fixtures"

# golden case -> converter variant
GOLDEN_VARIANTS = {
    "extension_fp32": "extension",
    "extension_bf16": "extension",
    "r2v_fp32": "reference",
    "r2v_bf16": "reference",
    "avatar_fp32": "avatar",
    "avatar_bf16": "avatar",
}


class GoldenCase:
    """One golden case of the original code: weights (original key names), config, inputs and outputs."""

    def __init__(self, name: str):
        self.name = name
        self.dir = FIXTURES / name
        self.meta = json.loads((self.dir / "case.json").read_text())
        self.tensors = load_file(str(self.dir / "tensors.safetensors"))
        self.variant = GOLDEN_VARIANTS[name]
        self.bf16 = self.meta["mode"] == "bf16"

    def input(self, key: str) -> torch.Tensor:
        return self.tensors[key].to(getattr(torch, self.meta["inputs"][key]["fed_dtype"]))

    def write_original_folder(self, folder: Path) -> Path:
        """The case's weights and config as an original checkpoint folder (`config.json` + safetensors)."""
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.dir / "weights.safetensors", folder / "model.safetensors")
        config = {"_class_name": self.meta["original_class"].rsplit(".", 1)[-1], **self.meta["model_config"]}
        (folder / "config.json").write_text(json.dumps(config))
        return folder


def tiny_transformer(variant: str, seed: int = 0, **overrides):
    from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
    from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS

    torch.manual_seed(seed)
    return SkyReelsV3Transformer3DModel(**{**TINY_TRANSFORMER_CONFIGS[variant], **overrides}).eval()


def tiny_inputs(model, variant: str, frames: int = 3, height: int = 8, width: int = 12, seed: int = 0) -> dict:
    """Random inputs for `model.forward` shaped for the variant (video frames in latent space)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(1, cfg.in_channels, frames, height, width, generator=g),
        "encoder_hidden_states": torch.randn(1, 7, cfg.text_dim, generator=g),
        "timestep": torch.tensor([937]),
    }
    if variant == "extension":
        inputs["timestep"] = torch.tensor([[0] + [888] * (frames - 1)])
    if variant == "avatar":
        inputs["timestep"] = torch.tensor([956.58])
        inputs["encoder_hidden_states_image"] = torch.randn(1, 257, cfg.image_dim, generator=g)
        inputs["audio_embeds"] = torch.randn(
            1,
            cfg.audio_vae_scale * (frames - 1) + 1,
            cfg.audio_window,
            cfg.audio_in_layers,
            cfg.audio_in_dim,
            generator=g,
        )
    return inputs


def random_image(height: int = 40, width: int = 60, seed: int = 0):
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_video(frames: int = 30, height: int = 32, width: int = 48, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a test's own servers and torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(*args: str, nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` with `nproc` processes on this machine, its rendezvous on a free loopback
    port, then `args` (a script, or `-m` and a module, and their arguments)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *args,
    ]
