"""Shared fixtures. The offline data lives in ../shared beside the repository, or where DFMPC_SHARED points."""
import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("DFMPC_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"offline data folder not found at {SHARED}; set DFMPC_SHARED")
    return SHARED
