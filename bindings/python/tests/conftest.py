"""Every test starts from `torch.manual_seed(0)` (CPU and CUDA generators), so a failure
reproduces alone (`pytest -k NAME`) on the same inputs, whatever ran before it."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
