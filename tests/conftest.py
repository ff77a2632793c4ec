import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when Ray workers run beside the test process.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
