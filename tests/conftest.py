import os

import pytest
import torch

# Without CUDA, the Triton kernels are tested in Triton's interpreter. The mode must be chosen before
# anything imports triton, and torch imports it early (any torch.optim optimizer loads torch._dynamo,
# which imports triton when installed), so it is set here for the whole session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (small models are faster and steadier that way), then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
