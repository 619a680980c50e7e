"""Every command, `--help` included, starts without torchao's kernel-loading noise on a CPU-only machine."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_help_prints_no_torchao_noise():
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "skyreels_diffusers.app.cli", "--help"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0 and "usage: skyreels-v3" in result.stdout
    output = result.stdout + result.stderr
    assert "Failed to load" not in output, output
    assert "Unable to import `torchao`" not in output, output
    assert "requires torchvision" not in output, output  # transformers' CLIP/Siglip image-processor fallbacks


def test_the_filter_drops_only_those_messages(caplog):
    import skyreels_diffusers  # noqa: F401  (installs the filters)

    logger = logging.getLogger("torchao")
    with caplog.at_level(logging.WARNING, logger="torchao"):
        logger.warning("Failed to load /x/site-packages/torchao/_C_cutlass_90a.abi3.so: Could not load this library")
        logger.warning("Failed to load something else")
        logger.warning("a real torchao problem")
    messages = [r.getMessage() for r in caplog.records]
    import torch

    assert ("a real torchao problem" in messages) and ("Failed to load something else" in messages)
    assert any("_C_cutlass" in m for m in messages) == torch.cuda.is_available()


def test_only_the_clip_and_siglip_fallback_messages_are_dropped(caplog):
    import skyreels_diffusers  # noqa: F401  (installs the filters)

    logger = logging.getLogger("transformers.utils.import_utils")
    fallback = (
        "`{0}ImageProcessor` requires torchvision (not installed); falling back to `{0}ImageProcessorPil` for "
        "backward compatibility. Install torchvision to use the default backend, or import `{0}ImageProcessorPil` "
        "directly to silence this warning."
    )
    with caplog.at_level(logging.WARNING, logger="transformers.utils.import_utils"):
        for name in ("CLIP", "Siglip", "Blip"):
            logger.warning(fallback.format(name))
        logger.warning("`Foo` requires torchvision (not installed)")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [fallback.format("Blip"), "`Foo` requires torchvision (not installed)"]
