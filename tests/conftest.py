"""pytest fixtures; the helpers live in `tests/helpers.py`."""

import pytest

from tests.helpers import GOLDEN_VARIANTS, GoldenCase


@pytest.fixture(params=list(GOLDEN_VARIANTS))
def golden_case(request) -> GoldenCase:
    return GoldenCase(request.param)
