"""pytest fixtures; the helpers live in `tests/helpers.py`."""

import os

import pytest
import torch

from tests.helpers import GOLDEN_VARIANTS, GoldenCase


# Triton chooses its interpreter when a kernel is defined, i.e. when our kernel module is first imported, which any
# test may trigger (the CLI and the presets import it): set it before any test module loads, on CPU machines.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=list(GOLDEN_VARIANTS))
def golden_case(request) -> GoldenCase:
    return GoldenCase(request.param)
