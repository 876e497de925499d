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
