"""The shared encoder-decoder: padding never changes a sequence's reconstruction, embedding or loss."""

from __future__ import annotations

import pytest
import torch

from rnnkit.tasks.encoders import SequenceAutoencoder, SeriesModelOptions


@pytest.mark.parametrize("start", ["state", "zeros"])
@pytest.mark.parametrize("teacher_forcing", [True, False])
def test_padded_sequence_reconstructs_as_alone(start: str, teacher_forcing: bool) -> None:
    torch.manual_seed(0)
    net = SequenceAutoencoder(2, SeriesModelOptions(hidden=5, layers=2), start=start)
    x = torch.randn(2, 6, 2)
    lengths = torch.tensor([6, 3])
    padded = x.clone()
    padded[1, 3:] = 1e4  # garbage in the padding
    alone = net(x[1:2, :3], None, teacher_forcing=teacher_forcing)
    torch.testing.assert_close(net(padded, lengths, teacher_forcing=teacher_forcing)[1:2, :3], alone)
    torch.testing.assert_close(net.embed(padded, lengths)[1:2], net.embed(x[1:2, :3]))
    clean = x.clone()
    clean[1, 3:] = 0
    torch.testing.assert_close(net.loss(padded, lengths), net.loss(clean, lengths))


def test_unknown_start_is_an_error() -> None:
    with pytest.raises(ValueError, match="start: expected one of"):
        SequenceAutoencoder(1, SeriesModelOptions(), start="go")
