"""Shared fixtures: models are expensive, so each configuration is built once per session."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from seeded_weights import seeded_state_dict  # noqa: E402

from dmdnet_plugin import DMDNet  # noqa: E402
from dmdnet_plugin.runtime import tune_cpu_allocator  # noqa: E402

DATA = Path(__file__).parent / "data"
# the runs' journals and locks, and the precision calibration, in a folder of this session, not in ~/.cache
os.environ.setdefault("DMDNET_CACHE", tempfile.mkdtemp(prefix="dmdnet_test_cache_"))
tune_cpu_allocator()
torch.set_num_threads(min(torch.get_num_threads(), 4))


@pytest.fixture(scope="session")
def official_net() -> DMDNet:
    """The released configuration with the seeded weights the parity data was made with."""
    net = DMDNet()
    net.load_state_dict(seeded_state_dict(net))
    return net.eval()


def small_net(seed: int = 0) -> DMDNet:
    """A small configuration (ngf 16, 8 atoms) with seeded weights, for file-format tests."""
    net = DMDNet(ngf=16, banks_num=8)
    net.load_state_dict(seeded_state_dict(net, seed=seed))
    return net.eval()


@pytest.fixture(scope="session")
def small() -> DMDNet:
    return small_net()


@pytest.fixture(scope="session")
def small_weights(tmp_path_factory) -> Path:
    """:func:`small_net` as a checkpoint file, for runs through the CLI."""
    from dmdnet_plugin.weights import save_checkpoint

    return save_checkpoint(small_net(), tmp_path_factory.mktemp("small_weights") / "small.safetensors")
