"""float64 gradcheck of every registered cell and variant under the reference and bptt kernels."""

import pytest
import torch
from cellcases import input_size, random_state

import rnnkit
from rnnkit.cells import REGISTRY


def _loss_fn(layer, n_state, lengths, seed):
    def f(x, *rest):
        state = rest[:n_state]
        params = dict(zip([n for n, _ in layer.named_parameters()], rest[n_state:]))
        torch.manual_seed(seed)  # the same dropout / zoneout masks at every evaluation
        out, final = torch.func.functional_call(layer, params, (x, state if n_state > 1 else state[0]),
                                                {"lengths": lengths})
        final = final if isinstance(final, tuple) else (final,)
        return (out.sin().sum(), *(s.cos().sum() for s in final))

    return f


@pytest.mark.parametrize("backend", ["reference", "bptt"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_gradcheck(name, backend):
    torch.manual_seed(0)
    I = input_size(name, 2, 3)
    layer = rnnkit.build(name, I, 3, num_layers=1, bidirectional=True, backend=backend).double()
    layer.train()
    T, B = 4, 2
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    state = random_state(name, 2, B, 3)
    state = state if isinstance(state, tuple) else (state,)
    inputs = [x, *state] + [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(_loss_fn(layer, len(state), [4, 3], 7), tuple(inputs), eps=1e-6, atol=1e-5,
                                     fast_mode=True)
