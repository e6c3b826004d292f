"""The embedded SmolLM2 model, loaded once per test module (skipped when it is not installed)."""

from __future__ import annotations

import pytest

from slimpass.eval import models


@pytest.fixture(scope="module")
def smollm():
    try:
        return models.load()
    except models.ModelNotFound as err:
        pytest.skip(f"needs the embedded SmolLM2 model (make installs it): {err}")
