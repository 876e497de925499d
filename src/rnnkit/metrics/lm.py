r"""Language-model scores from a summed cross-entropy: nats and bits per symbol, perplexity.

.. math::
    \ell = \tfrac1N \sum_t -\ln p(x_{t+1} \mid x_{\le t}), \quad \text{bits} = \ell / \ln 2, \quad
    \text{perplexity} = e^{\ell}
"""

from __future__ import annotations

import math

LN2 = math.log(2.0)


def lm_metrics(total_nats: float, count: int, unit: str = "char") -> dict[str, float]:
    """Loss per symbol in nats, bits (``bits_per_<unit>``) and perplexity from a summed cross-entropy."""
    nats = total_nats / count
    return {"loss_nats": nats, f"bits_per_{unit}": nats / LN2, "perplexity": math.exp(min(nats, 700.0))}


__all__ = ["LN2", "lm_metrics"]
