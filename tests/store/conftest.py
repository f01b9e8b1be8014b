from __future__ import annotations

from pathlib import Path

import pytest

from pensieve.config import default_data_dir
from pensieve.store.default_model import ensure_default_model
from tests.store.gguf_variants import Layout, layout_of


@pytest.fixture(scope="session")
def default_model() -> Path:
    return ensure_default_model(default_data_dir())


@pytest.fixture(scope="session")
def layout(default_model: Path) -> Layout:
    return layout_of(default_model)
