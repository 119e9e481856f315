import os

# One thread per test process (and, through the environment, per subprocess a test starts): the
# suite's models are tiny, so a second OpenMP thread gains little on a quiet machine and costs
# 5-30x per op when the 2 cores are shared with other work (OpenMP threads spin-wait on each other).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
