"""Known import-time noise of optional dependencies, filtered by exact message (nothing else is hidden).

* torchao (which diffusers imports as soon as a model class loads, whether or not quantisation is asked for) tries
  to load its CUDA kernel libraries (`_C_*.so`) and logs "Failed to load ...so" for each on a machine without CUDA,
  where they cannot be used anyway. Kept visible where CUDA is available (there a failed kernel load matters).
* diffusers then logs "Unable to import `torchao` Tensor objects", which only concerns loading checkpoints that were
  serialised already quantised by torchao; this project quantises at load time and never loads those.
* transformers (without torchvision) warns "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  `CLIPImageProcessorPil` ..." and the same for `SiglipImageProcessor` when diffusers imports those names at import
  time (its Stable Diffusion and IP-Adapter modules); this project never uses either processor. Only these two
  fallback messages are dropped: any other image processor's fallback, and every other warning, stays visible.
"""

from __future__ import annotations

import logging
import re


TORCHAO_KERNEL_PREFIX = "Failed to load "
DIFFUSERS_TORCHAO_TENSORS = "Unable to import `torchao` Tensor objects"
TORCHVISION_FALLBACK = re.compile(
    r"^`(CLIP|Siglip)ImageProcessor` requires torchvision \(not installed\); falling back to `\1ImageProcessorPil` "
)


class _TorchaoKernelNoise(logging.Filter):
    def __init__(self, cuda: bool):
        super().__init__()
        self.cuda = cuda

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(DIFFUSERS_TORCHAO_TENSORS):
            return False
        is_kernel = message.startswith(TORCHAO_KERNEL_PREFIX) and "/torchao/_C" in message and ".so" in message
        return not (is_kernel and not self.cuda)


class _TorchvisionFallbackNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not TORCHVISION_FALLBACK.match(record.getMessage())


def silence_known_noise() -> None:
    """Install the filters on their loggers (idempotent); call before diffusers' model classes are imported."""
    import torch

    for name in ("torchao", "diffusers.quantizers.torchao.torchao_quantizer"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _TorchaoKernelNoise) for f in logger.filters):
            logger.addFilter(_TorchaoKernelNoise(cuda=torch.cuda.is_available()))
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _TorchvisionFallbackNoise) for f in logger.filters):
        logger.addFilter(_TorchvisionFallbackNoise())
