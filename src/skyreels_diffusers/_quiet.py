"""Known import-time noise of optional dependencies, filtered by exact message (nothing else is hidden).

* torchao (which diffusers imports as soon as a model class loads, whether or not quantisation is asked for) tries
  to load its CUDA kernel libraries (`_C_*.so`) and logs "Failed to load ...so" for each on a machine without CUDA,
  where they cannot be used anyway. Kept visible where CUDA is available (there a failed kernel load matters).
* diffusers then logs "Unable to import `torchao` Tensor objects", which only concerns loading checkpoints that were
  serialised already quantised by torchao; this project quantises at load time and never loads those.
"""

from __future__ import annotations

import logging


TORCHAO_KERNEL_PREFIX = "Failed to load "
DIFFUSERS_TORCHAO_TENSORS = "Unable to import `torchao` Tensor objects"


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


def silence_known_noise() -> None:
    """Install the filters on the two loggers (idempotent); call before diffusers' model classes are imported."""
    import torch

    for name in ("torchao", "diffusers.quantizers.torchao.torchao_quantizer"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _TorchaoKernelNoise) for f in logger.filters):
            logger.addFilter(_TorchaoKernelNoise(cuda=torch.cuda.is_available()))
