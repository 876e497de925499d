"""rnnkit: recurrent neural networks from the classic literature, as real software."""

from .cells import REGISTRY
from .layers import GRU, LSTM, RNN, Recurrent, build

__version__ = "0.1.0"
__all__ = ["RNN", "LSTM", "GRU", "Recurrent", "build", "REGISTRY", "__version__"]
