"""Fixtures of the integration tests (tiny random models, fp32, CPU)."""

from __future__ import annotations

import pytest
import transformers

transformers.logging.set_verbosity_error()


@pytest.fixture
def olmoe():
    from .tiny_models import build

    return build("olmoe")
