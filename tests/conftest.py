"""Shared fixtures. The offline data folder is the one dfmpc itself finds ($DFMPC_SHARED, else ../shared beside
the repository); tests that need it are skipped where there is none (DFMPC_SHARED=none simulates that)."""
import pytest
import torch

from dfmpc.data import shared_dir

SHARED = shared_dir()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared():
    if SHARED is None:
        pytest.skip("offline data folder not found (../shared beside the repository, or $DFMPC_SHARED)")
    return SHARED
