"""Shared fixtures: paths to ../shared/data (skipped with a reason when absent) and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import openelm_mlx  # noqa: F401  (loads the optimized BLAS before any test module imports mlx)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("OPENELM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not present (the ../shared/data test assets are missing from this checkout)")
    return path


@pytest.fixture
def llama_tokenizer_path() -> Path:
    return shared_file("llama2-tokenizer.model")


@pytest.fixture
def configs_dir() -> Path:
    return shared_file("openelm-configs")
