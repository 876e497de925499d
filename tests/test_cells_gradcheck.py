"""float64 gradcheck of every registered cell and variant under the reference and bptt kernels."""

import pytest
import torch

import rnnkit
from rnnkit.cells import REGISTRY


def _loss_fn(layer, lengths, seed):
    def f(x, h0, *rest):
        params = dict(zip([n for n, _ in layer.named_parameters()], rest[-len(list(layer.parameters())):]))
        state = (h0, rest[0]) if layer.cell.state_size == 2 else h0
        torch.manual_seed(seed)  # the same dropout / zoneout masks at every evaluation
        out, final = torch.func.functional_call(layer, params, (x, state), {"lengths": lengths})
        final = final if isinstance(final, tuple) else (final,)
        return (out.sin().sum(), *(s.cos().sum() for s in final))

    return f


@pytest.mark.parametrize("backend", ["reference", "bptt"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_gradcheck(name, backend):
    torch.manual_seed(0)
    layer = rnnkit.build(name, 2, 3, num_layers=1, bidirectional=True, backend=backend).double()
    layer.train()
    T, B = 4, 2
    x = torch.randn(T, B, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, B, 3, dtype=torch.float64, requires_grad=True)
    inputs = [x, h0]
    if layer.cell.state_size == 2:
        inputs.append(torch.randn(2, B, 3, dtype=torch.float64, requires_grad=True))
    inputs += [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(_loss_fn(layer, [4, 3], 7), tuple(inputs), eps=1e-6, atol=1e-5,
                                     fast_mode=True)
