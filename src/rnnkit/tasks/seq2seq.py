r"""Sequence-to-sequence learning: a recurrent encoder-decoder with attention, greedy and beam decoding.

The encoder reads the source :math:`x_{1..S}` (any registered cell, optionally bidirectional, stacked);
its top layer's final state (both directions concatenated), :math:`\bar h`, starts the decoder
(Sutskever et al. 2014) through one learned map per decoder state component:
:math:`s_0^{(k)} = \tanh(W_k \bar h + b_k)`, reshaped to (layers, B, H). The decoder (any registered cell,
stacked) reads the previous target token and predicts the next:

.. math::
    h_t = \mathrm{RNN}([E y_{t-1};\ \tilde h_{t-1}], h_{t-1}), \quad
    c_t = \sum_s a_{ts} m_s, \quad \tilde h_t = \tanh(W_c [c_t; h_t]), \quad
    p(y_t \mid y_{<t}, x) = \mathrm{softmax}(W_o \tilde h_t + b_o)

with the encoder outputs :math:`m_s` as memory and :math:`a_t = \mathrm{softmax}_s(\mathrm{score}(h_t, m_s))`
over the valid source positions only (padding is masked to :math:`-\infty`). The attention score is

- ``"additive"`` (Bahdanau et al. 2015): :math:`v^\top \tanh(W_q h_t + W_k m_s)`;
- ``"multiplicative"`` (Luong et al. 2015, "general"): :math:`h_t^\top W_a m_s`;
- ``"none"`` (Cho et al. 2014 / Sutskever et al. 2014): no attention; :math:`c_t = \bar h` for every t.

Input feeding (Luong et al.) adds :math:`\tilde h_{t-1}` to the decoder input (otherwise only the token
embedding is fed, and teacher-forced training runs the decoder over all steps in one call). Scheduled
sampling (Bengio et al. 2015) replaces each teacher token by the model's own most probable previous
token with a probability that rises linearly from 0 to ``scheduled_sampling`` over
``scheduled_sampling_steps`` optimizer steps. Training is full backpropagation through time over
whole padded pairs: the encoder gets the lengths, and padded target steps are left out of the loss.

Decoding (:func:`decode`) is the greedy and beam search of :mod:`rnnkit.tasks.decoding`: batched, never
producing ``<pad>`` or ``<s>``, stopping each sequence at ``</s>`` or after
``floor(max_length_ratio * source length) + max_length_extra`` tokens. The scores are those of
:mod:`rnnkit.metrics.sequence`; run directories, checkpoints and model options are the shared ones of
:mod:`rnnkit.tasks.base` and :mod:`rnnkit.tasks.options`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cells import REGISTRY
from ..data.pairs import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    Pair,
    PairVocabs,
    Tokens,
    cmudict_pairs,
    detokenize,
    encode_pairs,
    limit_length,
    read_pairs,
)
from ..errors import UserError
from ..metrics.sequence import sequence_metrics, translation_metrics
from ..train.checkpoint import atomic_write_bytes
from ..train.config import OptimConfig, ScheduleConfig, TrainerConfig
from . import decoding
from .base import (
    as_user_error,
    atomic_json,
    check_saved_vocab,
    load_checkpoint_into,
    open_run_dir,
    pyplot,
    read_run,
    reporter,
    restore_best,
    save_figure,
    with_budget,
)
from .decoding import Decoded
from .options import RecurrentOptions

VOCAB_FILE = "vocab.json"
ATTENTION_PNG = "attention.png"


# ---- model ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StackConfig(RecurrentOptions):
    """One recurrent stack (``[model.encoder]`` / ``[model.decoder]``): the shared model options (cell,
    variant options, ``dropout`` between layers, backend) and its size.

    Args:
        hidden_size: units per layer (and per direction for a bidirectional encoder).
        num_layers: stacked layers.
    """

    hidden_size: int = 256
    num_layers: int = 1

    @property
    def state_size(self) -> int:
        """State tensors of the cell (2 for the LSTM family: h and c)."""
        return 2 if REGISTRY[self.cell].family == "lstm" else 1


@dataclass(frozen=True)
class Seq2SeqModelConfig:
    """The encoder-decoder (``[model]``); see the module docstring for the equations.

    Args:
        embedding_size: width of the source and target token embeddings.
        encoder, decoder: the two recurrent stacks.
        bidirectional: read the source in both directions (the encoder's outputs are 2 x hidden wide).
        attention: "none", "additive" or "multiplicative".
        attention_size: hidden width of the additive score (0 = the decoder's hidden size).
        input_feeding: feed the previous attentional vector to the decoder input.
        tie_embeddings: share the target embedding with the output layer (a projection H -> E is added
            when the sizes differ).
        share_embeddings: one embedding for source and target; needs identical vocabularies (set
            ``data.shared_vocab``).
        dropout: on the embeddings and on the attentional vector before the output layer.
    """

    embedding_size: int = 128
    encoder: StackConfig = field(default_factory=StackConfig)
    decoder: StackConfig = field(default_factory=StackConfig)
    bidirectional: bool = True
    attention: Literal["none", "additive", "multiplicative"] = "multiplicative"
    attention_size: int = 0
    input_feeding: bool = False
    tie_embeddings: bool = False
    share_embeddings: bool = False
    dropout: float = 0.2


@dataclass
class Encoded:
    """The encoder's output as the decoder uses it (batch index on dim 0, except ``state``: dim 1).

    Shape: memory (B, S, De), keys (B, S, K) (the attention's source side, precomputed), mask (B, S)
    True at valid positions, summary (B, De), state as the decoder stack's (L, B, H) tensors.
    """

    memory: Tensor
    keys: Tensor | None
    mask: Tensor
    summary: Tensor
    state: Any

    def select(self, index: Tensor) -> Encoded:
        """The rows ``index`` of the batch (beam expansion)."""
        return Encoded(self.memory[index], None if self.keys is None else self.keys[index], self.mask[index],
                       self.summary[index], select_state(self.state, index))


@dataclass
class DecoderState:
    """What the decoder carries between steps: the encoding, the recurrent state and the input feed
    (the previous attentional vector (B, Hd), or None without input feeding)."""

    enc: Encoded
    rnn: Any
    feed: Tensor | None

    def select(self, index: Tensor) -> DecoderState:
        return DecoderState(self.enc.select(index), select_state(self.rnn, index),
                            None if self.feed is None else self.feed.index_select(0, index))


def select_state(state: Any, index: Tensor) -> Any:
    """Rows ``index`` of a recurrent state in torch.nn layout (batch on dim 1)."""
    if isinstance(state, tuple):
        return tuple(s.index_select(1, index) for s in state)
    return state.index_select(1, index)


class Attention(nn.Module):
    """Additive or multiplicative attention over a masked memory.

    Shape: query (B, T, Hd), keys (B, S, K) from :meth:`keys`, memory (B, S, De), mask (B, S)
    -> context (B, T, De), weights (B, T, S) summing to 1 over the valid positions.
    """

    def __init__(self, kind: str, query_size: int, memory_size: int, size: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "multiplicative":
            self.W_a = nn.Linear(memory_size, query_size, bias=False)
        elif kind == "additive":
            self.W_k = nn.Linear(memory_size, size, bias=False)
            self.W_q = nn.Linear(query_size, size, bias=True)
            self.v = nn.Linear(size, 1, bias=False)
        else:
            raise ValueError(f"attention: expected 'additive' or 'multiplicative', got {kind!r}")

    def keys(self, memory: Tensor) -> Tensor:
        return self.W_a(memory) if self.kind == "multiplicative" else self.W_k(memory)

    def forward(self, query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if self.kind == "multiplicative":
            scores = query @ keys.transpose(1, 2)  # (B, T, S)
        else:
            q = self.W_q(query)  # (B, T, A)
            scores = self.v(torch.tanh(q.unsqueeze(2) + keys.unsqueeze(1))).squeeze(-1)  # (B, T, S)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return weights @ memory, weights


class Seq2Seq(nn.Module):
    """Recurrent encoder-decoder over token ids; see the module docstring.

    Shape: ``forward(src (S, B), src_len (B,), tgt_in (T, B))`` -> logits (T, B, Vt) and attention
    weights (B, T, S) (None without attention).
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, config: Seq2SeqModelConfig | None = None) -> None:
        super().__init__()
        cfg = config or Seq2SeqModelConfig()
        self.config = cfg
        if min(src_vocab_size, tgt_vocab_size) < 5:
            raise ValueError(f"vocabularies: expected at least one token besides the 4 specials, got sizes "
                             f"{src_vocab_size} and {tgt_vocab_size}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"model.dropout: expected a probability in [0, 1), got {cfg.dropout}")
        if cfg.embedding_size < 1:
            raise ValueError(f"model.embedding_size: expected >= 1, got {cfg.embedding_size}")
        if cfg.attention not in ("none", "additive", "multiplicative"):
            raise ValueError(f"model.attention: expected 'none', 'additive' or 'multiplicative', got "
                             f"{cfg.attention!r}")
        if cfg.share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(f"model.share_embeddings: needs one vocabulary for both sides (data.shared_vocab), "
                             f"got {src_vocab_size} source and {tgt_vocab_size} target tokens")
        E, Hd = cfg.embedding_size, cfg.decoder.hidden_size
        D = 2 if cfg.bidirectional else 1
        De = D * cfg.encoder.hidden_size
        self.src_embedding = nn.Embedding(src_vocab_size, E, padding_idx=PAD_ID)
        self.tgt_embedding = self.src_embedding if cfg.share_embeddings else \
            nn.Embedding(tgt_vocab_size, E, padding_idx=PAD_ID)
        self.encoder = cfg.encoder.build_stack(E, bidirectional=cfg.bidirectional)
        self.decoder = cfg.decoder.build_stack(E + (Hd if cfg.input_feeding else 0))
        self.bridge = nn.ModuleList(nn.Linear(De, cfg.decoder.num_layers * Hd)
                                    for _ in range(cfg.decoder.state_size))
        self.attention = None if cfg.attention == "none" else \
            Attention(cfg.attention, Hd, De, cfg.attention_size or Hd)
        self.combine = nn.Linear(De + Hd, Hd, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(Hd, E, bias=False) if cfg.tie_embeddings and E != Hd else None
        self.out = nn.Linear(E if cfg.tie_embeddings else Hd, tgt_vocab_size)
        if cfg.tie_embeddings:
            self.out.weight = self.tgt_embedding.weight
        self.tgt_vocab_size = tgt_vocab_size

    # -- encoder
    def encode(self, src: Tensor, src_len: Tensor) -> Encoded:
        """Encode ``src`` (S, B) with valid lengths ``src_len`` (B,)."""
        S, B = src.shape
        emb = self.drop(self.src_embedding(src))  # (S, B, E)
        out, final = self.encoder(emb, lengths=src_len)  # (S, B, De)
        h = final[0] if isinstance(final, tuple) else final  # (Le * D, B, He)
        D = 2 if self.config.bidirectional else 1
        summary = h[-D:].transpose(0, 1).reshape(B, -1)  # (B, De): top layer, both directions
        L, Hd = self.config.decoder.num_layers, self.config.decoder.hidden_size
        parts = tuple(torch.tanh(lin(summary)).view(B, L, Hd).transpose(0, 1).contiguous() for lin in self.bridge)
        state = parts if len(parts) == 2 else parts[0]
        memory = out.transpose(0, 1)  # (B, S, De)
        mask = torch.arange(S, device=src.device).unsqueeze(0) < src_len.to(src.device).unsqueeze(1)
        keys = self.attention.keys(memory) if self.attention is not None else None
        return Encoded(memory, keys, mask, summary, state)

    # -- decoder
    def attend(self, h: Tensor, enc: Encoded) -> tuple[Tensor, Tensor | None]:
        """Attentional vectors (B, T, Hd) for decoder outputs ``h`` (B, T, Hd), and the weights (B, T, S)."""
        if self.attention is None:
            context, weights = enc.summary.unsqueeze(1).expand(-1, h.shape[1], -1), None
        else:
            context, weights = self.attention(h, enc.keys, enc.memory, enc.mask)
        return torch.tanh(self.combine(torch.cat([context, h], dim=-1))), weights

    def logits(self, h_att: Tensor) -> Tensor:
        h = self.drop(h_att)
        if self.proj is not None:
            h = self.proj(h)
        return self.out(h)

    def start(self, src: Tensor, src_len: Tensor) -> DecoderState:
        """Encode ``src`` (S, B) and return the decoder's state before its first step."""
        enc = self.encode(src, src_len)
        feed = enc.memory.new_zeros(enc.memory.shape[0], self.config.decoder.hidden_size) \
            if self.config.input_feeding else None
        return DecoderState(enc, enc.state, feed)

    def decode_step(self, tok: Tensor, st: DecoderState) -> tuple[Tensor, DecoderState, Tensor | None]:
        """One decoder step: tokens (B,) -> logits (B, Vt), the next state, attention weights (B, S) or None."""
        x = self.drop(self.tgt_embedding(tok))  # (B, E)
        if st.feed is not None:
            x = torch.cat([x, st.feed], dim=-1)
        h, rnn = self.decoder.step(x, st.rnn)  # (B, Hd)
        h_att, w = self.attend(h.unsqueeze(1), st.enc)
        feed = h_att[:, 0] if st.feed is not None else None
        return self.logits(h_att[:, 0]), DecoderState(st.enc, rnn, feed), None if w is None else w[:, 0]

    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor, sample_prob: float = 0.0
                ) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced logits (T, B, Vt) for the decoder inputs ``tgt_in`` (T, B) (``<s> y_1 ..``).

        With input feeding or ``sample_prob > 0`` the decoder runs step by step (each step needs the
        previous one's output); otherwise over all steps in one call.
        """
        st = self.start(src, src_len)
        if not self.config.input_feeding and sample_prob <= 0:
            emb = self.drop(self.tgt_embedding(tgt_in))  # (T, B, E)
            h, _ = self.decoder(emb, st.rnn)  # (T, B, Hd)
            h_att, w = self.attend(h.transpose(0, 1), st.enc)  # (B, T, Hd)
            return self.logits(h_att).transpose(0, 1), w
        logits, weights = [], []
        for t in range(tgt_in.shape[0]):
            tok = tgt_in[t]
            if t > 0 and sample_prob > 0:
                own = logits[-1].detach().argmax(-1)
                tok = torch.where(torch.rand(tok.shape, device=tok.device) < sample_prob, own, tok)
            lg, st, w = self.decode_step(tok, st)
            logits.append(lg)
            weights.append(w)
        attn = None if weights[0] is None else torch.stack(weights, 1)
        return torch.stack(logits), attn


def build_model(src_vocab_size: int, tgt_vocab_size: int, cfg: Seq2SeqModelConfig) -> Seq2Seq:
    """:class:`Seq2Seq` with configuration errors raised as :class:`UserError`."""
    try:
        return Seq2Seq(src_vocab_size, tgt_vocab_size, cfg)
    except (ValueError, TypeError) as e:
        raise as_user_error(e) from None


# ---- training objective ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectiveConfig:
    """The training loss (``[objective]``).

    Args:
        label_smoothing: of the cross-entropy (0 = none).
        scheduled_sampling: the final probability of feeding the model's own previous token.
        scheduled_sampling_steps: optimizer steps over which that probability rises linearly from 0.
    """

    label_smoothing: float = 0.0
    scheduled_sampling: float = 0.0
    scheduled_sampling_steps: int = 10_000


class Buckets(torch.utils.data.Dataset):
    """Training pairs grouped into batches of equal source length (then by target length), formed once
    from a seeded shuffle: item i is a whole batch of at most ``batch_size`` pairs.

    Equal source lengths leave the encoder without padding (no masking, the fastest kernels) and the
    grouping by target length keeps the decoder's padding small; the Trainer shuffles the batch order
    every epoch (run it with ``batch_size=1`` and :meth:`collate`).
    """

    def __init__(self, data: dict[str, Tensor], batch_size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        n = data["src"].shape[0]
        perm = torch.randperm(n, generator=g)
        key = data["src_len"][perm] * 10_000 + data["tgt_len"][perm]
        order = perm[torch.sort(key, stable=True).indices]
        src_len = data["src_len"][order]
        self.batches: list[Tensor] = []
        start = 0
        for count in torch.unique_consecutive(src_len, return_counts=True)[1].tolist():
            self.batches += list(order[start:start + count].split(batch_size))
            start += count
        self.data = data

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[self.batches[i]] for k, v in self.data.items()}

    @staticmethod
    def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if len(items) == 1:
            return items[0]
        return {k: torch.cat([it[k] for it in items]) for k in items[0]}


def trim(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A padded batch cut to its longest pair, time-major: src (S, B), src_len, tgt_in (T, B),
    tgt_out (T, B), mask (T, B) of the predicted steps."""
    S = int(batch["src_len"].max())
    T = int(batch["tgt_len"].max())
    src = batch["src"][:, :S].t()
    tgt = batch["tgt"][:, :T + 1].t()
    mask = torch.arange(T, device=tgt.device).unsqueeze(1) < batch["tgt_len"].to(tgt.device).unsqueeze(0)
    return src, batch["src_len"], tgt[:-1], tgt[1:], mask


class Seq2SeqTask:
    """The Trainer's view: mean token cross-entropy over the predicted steps of a batch of pairs."""

    collate = staticmethod(Buckets.collate)

    def __init__(self, objective: ObjectiveConfig | None = None) -> None:
        self.objective = objective or ObjectiveConfig()
        self.trainer: Any = None  # set after the Trainer is built: scheduled sampling reads its step

    def sample_prob(self) -> float:
        o = self.objective
        if o.scheduled_sampling <= 0 or self.trainer is None:
            return 0.0
        return o.scheduled_sampling * min(1.0, self.trainer.step / max(1, o.scheduled_sampling_steps))

    def loss(self, model: Seq2Seq, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        src, src_len, tgt_in, tgt_out, mask = trim(batch)
        logits, _ = model(src, src_len, tgt_in, self.sample_prob() if model.training else 0.0)
        per = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), reduction="none",
                              label_smoothing=self.objective.label_smoothing)
        m = mask.flatten().to(per.dtype)
        n = int(mask.sum())
        return (per * m).sum() / max(n, 1), n


# ---- decoding -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeConfig:
    """Decoding settings (``[decode]``; ``eval`` / ``translate`` flags override).

    Args:
        beam_size: 1 = greedy decoding.
        length_penalty: alpha of :math:`((5 + n) / 6)^\\alpha` dividing the final beam scores (0 = none).
        max_length_ratio, max_length_extra: at most ``floor(ratio * source length) + extra`` output
            tokens (``</s>`` included) per sequence.
        batch_size: sequences decoded together.
    """

    beam_size: int = 5
    length_penalty: float = 0.6
    max_length_ratio: float = 2.0
    max_length_extra: int = 10
    batch_size: int = 256


def length_limits(src_len: Tensor, cfg: DecodeConfig) -> Tensor:
    """Per-sequence maximum number of output tokens (``</s>`` included), at least 1."""
    return (src_len.double() * cfg.max_length_ratio).floor().long().add(cfg.max_length_extra).clamp_min(1)


def _check_decode(cfg: DecodeConfig) -> None:
    if cfg.beam_size < 1:
        raise UserError(f"--beam-size: expected >= 1, got {cfg.beam_size}")
    if cfg.max_length_ratio < 0 or cfg.max_length_extra < 0 or cfg.max_length_ratio + cfg.max_length_extra <= 0:
        raise UserError(f"decode.max_length_ratio / max_length_extra: expected >= 0 and not both 0, got "
                        f"{cfg.max_length_ratio} / {cfg.max_length_extra}")
    if cfg.batch_size < 1:
        raise UserError(f"decode.batch_size: expected >= 1, got {cfg.batch_size}")


NEVER = (PAD_ID, BOS_ID)  # symbols a decoder never outputs


def decode(model: Seq2Seq, src: Tensor, src_len: Tensor, cfg: DecodeConfig = DecodeConfig()) -> Decoded:
    """Greedy search for ``beam_size`` 1, beam search otherwise, of a batch ``src`` (S, B), ``src_len`` (B,)."""
    _check_decode(cfg)
    was_training = model.training
    model.eval()
    limit = length_limits(src_len, cfg)
    try:
        if cfg.beam_size == 1:
            return decoding.greedy_search(model, src, src_len, limit, start=BOS_ID, end=EOS_ID, forbid=NEVER)
        return decoding.beam_search(model, src, src_len, limit, beam_size=cfg.beam_size, start=BOS_ID, end=EOS_ID,
                                    forbid=NEVER, alpha=cfg.length_penalty)
    finally:
        model.train(was_training)


def decode_all(model: Seq2Seq, sources: Sequence[Sequence[int]], cfg: DecodeConfig = DecodeConfig()) -> Decoded:
    """Decode token-id sequences, ``cfg.batch_size`` at a time in order of length (less padding, and
    sequences of a batch finish together); the results are in input order."""
    device = next(model.parameters()).device
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    ids: list[list[int]] = [[] for _ in sources]
    scores = [0.0] * len(sources)
    attn: list[Tensor | None] = [None] * len(sources)
    for start in range(0, len(order), cfg.batch_size):
        chunk = order[start:start + cfg.batch_size]
        lens = torch.tensor([len(sources[i]) for i in chunk])
        src = torch.full((int(lens.max()), len(chunk)), PAD_ID, dtype=torch.int64)
        for b, i in enumerate(chunk):
            src[:len(sources[i]), b] = torch.tensor(sources[i], dtype=torch.int64)
        out = decode(model, src.to(device), lens.to(device), cfg)
        for b, i in enumerate(chunk):
            ids[i], scores[i], attn[i] = out.ids[b], out.scores[b], out.attention[b]
    return Decoded(ids, scores, attn)


# ---- data -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seq2SeqDataConfig:
    """Data settings (``[data]``).

    Args:
        train, valid, test: pairs files (TSV, or CSV by extension); ``train`` None = the built-in G2P set.
            Without ``valid``, the last ``valid_fraction`` of the shuffled training pairs (seed 0) is held out.
        source_tokens, target_tokens: "char" or "space" (whitespace tokens); the G2P set is letters ->
            phonemes (char -> space) whatever these say.
        delimiter: "\\t" or ","; None picks by extension.
        header: the files start with a header line.
        stress: G2P: keep the stress digits of the phonemes (AH0, EY1).
        max_source_len, max_target_len: longest pair kept, in tokens (0 = no limit); ``too_long``:
            "drop" (and count) or "error".
        shared_vocab: one vocabulary for both sides (for ``model.share_embeddings``).
        bucket: train on batches of equal source length (:class:`Buckets`); else on random batches.
        eval_pairs: validation pairs decoded at each evaluation (0 = all).
    """

    train: str | None = None
    valid: str | None = None
    test: str | None = None
    source_tokens: Tokens = "char"
    target_tokens: Tokens = "char"
    delimiter: str | None = None
    header: bool = False
    encoding: str = "utf-8"
    stress: bool = False
    max_source_len: int = 100
    max_target_len: int = 100
    too_long: Literal["drop", "error"] = "drop"
    shared_vocab: bool = False
    bucket: bool = True
    valid_fraction: float = 0.05
    eval_pairs: int = 0

    @property
    def builtin(self) -> bool:
        return self.train is None

    def sides(self) -> tuple[Tokens, Tokens]:
        """Tokenisation of (source, target)."""
        return ("char", "space") if self.builtin else (self.source_tokens, self.target_tokens)


def _default_trainer() -> TrainerConfig:
    return TrainerConfig(batch_size=64, clip_norm=5.0, eval_every=1000, log_every=100, metric="ser",
                         optim=OptimConfig(name="adam", lr=1e-3),
                         schedule=ScheduleConfig(name="plateau", decay=0.5, patience=2, min_factor=0.05))


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Everything a ``seq2seq train`` run is made of; saved as the run's ``config.toml``."""

    model: Seq2SeqModelConfig = field(default_factory=Seq2SeqModelConfig)
    data: Seq2SeqDataConfig = field(default_factory=Seq2SeqDataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    trainer: TrainerConfig = field(default_factory=_default_trainer)


DEFAULT_MINUTES = 10.0


def load_split(cfg: Seq2SeqDataConfig, split: str, path: str | None = None) -> tuple[list[Pair], str]:
    """Pairs of one split: ``path`` if given, else the config's file for it, else the built-in set's split."""
    src_t, tgt_t = cfg.sides()
    path = path if path is not None else getattr(cfg, split)
    if path is not None:
        return read_pairs(path, source_tokens=src_t, target_tokens=tgt_t, delimiter=cfg.delimiter,
                          header=cfg.header, encoding=cfg.encoding), str(path)
    if not cfg.builtin:
        raise UserError(f"--{split}: no {split} file given (the run was trained on {cfg.train}); pass --{split}")
    return cmudict_pairs(split, cfg.stress), f"cmudict ({split} split)"


@dataclass
class Seq2SeqData:
    """Training and validation pairs with their vocabularies."""

    train: list[Pair]
    valid: list[Pair]
    vocabs: PairVocabs
    dropped: int
    name: str


def prepare_data(cfg: Seq2SeqDataConfig) -> Seq2SeqData:
    """Read, split, length-limit and index the training data."""
    train, name = load_split(cfg, "train")
    if cfg.builtin or cfg.valid is not None:
        valid, _ = load_split(cfg, "valid")
    else:
        if not 0.0 < cfg.valid_fraction < 1.0:
            raise UserError(f"data.valid_fraction: expected a fraction in (0, 1), got {cfg.valid_fraction}")
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(train), generator=g).tolist()
        n_valid = max(1, round(len(train) * cfg.valid_fraction))
        if len(train) - n_valid < 1:
            raise UserError(f"--train {name}: {len(train)} pair(s) are too few to hold out a validation part; "
                            f"pass --valid")
        valid = [train[i] for i in order[-n_valid:]]
        train = [train[i] for i in order[:-n_valid]]
    train, dropped = limit_length(train, cfg.max_source_len, cfg.max_target_len, cfg.too_long, name)
    valid, dropped_v = limit_length(valid, cfg.max_source_len, cfg.max_target_len, cfg.too_long, name)
    if not train:
        raise UserError(f"--train {name}: every pair is longer than data.max_source_len={cfg.max_source_len} / "
                        f"max_target_len={cfg.max_target_len}")
    return Seq2SeqData(train, valid, PairVocabs.build(train, cfg.shared_vocab), dropped + dropped_v, name)


# ---- evaluation -----------------------------------------------------------------------------------
def evaluate_pairs(model: Seq2Seq, pairs: Sequence[Pair], vocabs: PairVocabs, cfg: DecodeConfig, tgt_kind: Tokens,
                   text: bool) -> tuple[dict[str, Any], Decoded]:
    """Decode the sources of ``pairs`` and score them against the targets (tokens as written, so an
    unseen target token always counts as an error). Also counts source and target tokens outside the
    vocabularies (``unknown_*_tokens``; unseen tokens are ``<unk>`` for the model)."""
    out = decode_all(model, [vocabs.source.encode(p.source) for p in pairs], cfg)
    hyps = [vocabs.target.decode(ids) for ids in out.ids]
    refs = [list(p.target) for p in pairs]
    m: dict[str, Any] = sequence_metrics(refs, hyps)
    if text:
        m.update(translation_metrics([detokenize(r, tgt_kind) for r in refs], [detokenize(h, tgt_kind) for h in hyps]))
    m["pairs"] = len(pairs)
    m["unknown_source_tokens"] = sum(vocabs.source.unknown(p.source) for p in pairs)
    m["unknown_target_tokens"] = sum(vocabs.target.unknown(p.target) for p in pairs)
    return m, out


@torch.no_grad()
def pairs_loss(model: Seq2Seq, data: dict[str, Tensor], batch_size: int = 256) -> float:
    """Mean teacher-forced cross-entropy (nats per target token) over encoded pairs."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    task = Seq2SeqTask()
    for i in range(0, data["src"].shape[0], batch_size):
        loss, k = task.loss(model, {key: v[i:i + batch_size].to(device) for key, v in data.items()})
        total += float(loss) * k
        count += k
    model.train(was_training)
    return total / max(count, 1)


def plot_attention(items: Sequence[tuple[Sequence[str], Sequence[str], Tensor]], path: str | Path,
                   columns: int = 2) -> Path:
    """Heat maps of attention weights: ``items`` of (source tokens, output tokens, weights
    (len(output) + 1, len(source))), the last row being the step that produced ``</s>``."""
    plt = pyplot()
    n = len(items)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (src, out, w) in zip(axes.flat, items):
        ax.imshow(w.float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(src)), ["␣" if t == " " else t for t in src], fontsize=8)
        ax.set_yticks(range(len(out) + 1), ["␣" if t == " " else t for t in out] + ["</s>"], fontsize=8)
        ax.set_xlabel("source")
        ax.set_ylabel("output")
    return save_figure(fig, Path(path))


# ---- train ----------------------------------------------------------------------------------------
def train(cfg: Seq2SeqConfig, run_dir: str | Path, *, resume: bool = False, quiet: bool = False,
          progress: bool | None = None) -> dict[str, Any]:
    """Train an encoder-decoder into ``run_dir``; return the final validation metrics of the best
    evaluation's weights (which the model ends with).

    Nothing in an existing run directory is touched unless the inputs check out (``--resume`` with the
    same vocabularies, or a directory without checkpoints).
    """
    from ..train import Trainer, seed_everything
    from ..train.config import replace_config

    cfg = with_budget(cfg, DEFAULT_MINUTES)
    run_dir = open_run_dir(run_dir, resume)
    _check_decode(cfg.decode)
    data = prepare_data(cfg.data)
    vocab_path = run_dir / VOCAB_FILE
    if resume:
        check_saved_vocab(vocab_path, data.vocabs, "tokens")
    seed_everything(cfg.trainer.seed)
    model = build_model(len(data.vocabs.source), len(data.vocabs.target), cfg.model)
    say = reporter(quiet)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"data {data.name}: {len(data.train):,} training / {len(data.valid):,} validation pairs"
        f"{f' ({data.dropped} over the length limits dropped)' if data.dropped else ''}; vocabularies "
        f"{len(data.vocabs.source)} source / {len(data.vocabs.target)} target tokens (with 4 specials)")
    m = cfg.model
    say(f"model: {m.encoder.cell} encoder {m.encoder.num_layers}x{m.encoder.hidden_size}"
        f"{' bidirectional' if m.bidirectional else ''}, {m.decoder.cell} decoder {m.decoder.num_layers}x"
        f"{m.decoder.hidden_size}, attention {m.attention}{', input feeding' if m.input_feeding else ''}; "
        f"{n_params:,} parameters")
    train_t = encode_pairs(data.train, data.vocabs.source, data.vocabs.target)
    valid = data.valid[:cfg.data.eval_pairs] if cfg.data.eval_pairs else data.valid
    valid_t = encode_pairs(valid, data.vocabs.source, data.vocabs.target) if valid else None
    greedy = replace(cfg.decode, beam_size=1)
    _, tgt_kind = cfg.data.sides()

    def evaluate(mdl: nn.Module) -> dict[str, float]:
        res, _ = evaluate_pairs(mdl, valid, data.vocabs, greedy, tgt_kind, text=False)
        return {"loss": pairs_loss(mdl, valid_t, cfg.decode.batch_size), "ser": res["sequence_error_rate"],
                "ter": res["token_error_rate"]}

    task = Seq2SeqTask(cfg.objective)
    samples: Any = train_t
    trainer_cfg = cfg.trainer
    if cfg.data.bucket:  # the Trainer sees whole batches as its samples
        samples = Buckets(train_t, cfg.trainer.batch_size, cfg.trainer.seed)
        trainer_cfg = replace_config(cfg.trainer, batch_size=1)
    trainer = Trainer(model, task, samples, trainer_cfg, run_dir, evaluate=evaluate if valid else None,
                      resume=resume, quiet=quiet, progress=progress, full_config=cfg)
    task.trainer = trainer
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_json(vocab_path, data.vocabs.to_dict())
    result = trainer.fit()
    out = {"steps": result["step"], "epochs_done": result["epochs_done"], "train_loss": result.get("train_loss"),
           "elapsed_s": result["elapsed_s"], "stop_reason": result["stop_reason"],
           "train_pairs": len(data.train), "valid_pairs": len(data.valid), "dropped_pairs": data.dropped,
           "parameters": n_params, "run_dir": str(run_dir)}
    if valid:
        out["restored_step"] = restore_best(trainer, model) or trainer.step
        model.eval()
        out.update({f"valid_{k}": v for k, v in evaluate(model).items()})
        _write_attention(model, valid[:4], data.vocabs, run_dir / ATTENTION_PNG)
    atomic_json(run_dir / "final_metrics.json", out)
    return out


def _write_attention(model: Seq2Seq, pairs: Sequence[Pair], vocabs: PairVocabs, path: Path) -> Path | None:
    if model.attention is None:
        return None
    out = decode_all(model, [vocabs.source.encode(p.source) for p in pairs], DecodeConfig(beam_size=1))
    items = [(p.source, vocabs.target.decode(ids), a) for p, ids, a in zip(pairs, out.ids, out.attention)]
    return plot_attention(items, path)


# ---- trained runs ---------------------------------------------------------------------------------
@dataclass
class LoadedRun:
    """A trained run: config, vocabularies, model (eval mode; or an exported pair of graphs,
    :class:`rnnkit.export.runner.OnnxSeq2Seq`, which decodes the same way) and the checkpoint step."""

    run_dir: Path
    config: Seq2SeqConfig
    vocabs: PairVocabs
    model: Seq2Seq
    step: int


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str = "cpu") -> LoadedRun:
    """Rebuild the model of a run directory from ``config.toml``, ``vocab.json`` and a checkpoint
    ("best", "latest" or a step number)."""
    def read_vocab(d: Any, run_dir: Path) -> PairVocabs:
        try:
            return PairVocabs.from_dict(d)
        except UserError:
            raise UserError(f"RUN_DIR {str(run_dir)!r}: not a seq2seq run ({VOCAB_FILE} holds another task's "
                            f"vocabulary)") from None

    run_dir, vocabs, cfg = read_run(run_dir, Seq2SeqConfig, read_vocab, VOCAB_FILE)
    model = build_model(len(vocabs.source), len(vocabs.target), cfg.model)
    step = load_checkpoint_into(model, run_dir, checkpoint)
    model.to(device).eval()
    return LoadedRun(run_dir, cfg, vocabs, model, step)


def evaluate_run(run: LoadedRun, path: str | None = None, split: str = "test", decode_cfg: DecodeConfig | None = None,
                 predictions: str | Path | None = None) -> dict[str, Any]:
    """Score a trained model on a pairs file (default: the run's ``split``; for the built-in G2P set, its
    fixed split). Long pairs are decoded all the same (the length limits are for training)."""
    cfg = decode_cfg or run.config.decode
    _check_decode(cfg)
    pairs, name = load_split(run.config.data, split, path)
    _, tgt_kind = run.config.data.sides()
    text = not run.config.data.builtin
    t0 = time.perf_counter()
    m, out = evaluate_pairs(run.model, pairs, run.vocabs, cfg, tgt_kind, text)
    m.update({"data": name, "beam_size": cfg.beam_size, "checkpoint_step": run.step,
              "decode_s": round(time.perf_counter() - t0, 3)})
    if predictions is not None:
        src_kind = run.config.data.sides()[0]
        lines = [f"{detokenize(p.source, src_kind)}\t{detokenize(p.target, tgt_kind)}\t"
                 f"{detokenize(run.vocabs.target.decode(ids), tgt_kind)}\n" for p, ids in zip(pairs, out.ids)]
        atomic_write_bytes(Path(predictions), "".join(lines).encode("utf-8"))
    return m


def translate(run: LoadedRun, sources: Iterable[tuple[str, Sequence[str]]], decode_cfg: DecodeConfig | None = None,
              write: Callable[[str], None] | None = None, attention_dir: str | Path | None = None) -> list[str]:
    """Decode ``(where, tokens)`` items as they arrive, ``decode_cfg.batch_size`` at a time, and write each
    output line to ``write`` as soon as its batch is done; optionally save each item's attention as
    ``attention_dir/NNNNN.png`` (heat map) and ``.json`` (source and output tokens, weights with one row per
    output token and ``</s>``), numbered from 1 in input order. Returns the output lines."""
    cfg = decode_cfg or run.config.decode
    _check_decode(cfg)
    src_kind, tgt_kind = run.config.data.sides()
    if attention_dir is not None and run.config.model.attention == "none":
        raise UserError("--attention-dir: the model has no attention (model.attention = 'none')")
    outputs: list[str] = []
    pending: list[Sequence[str]] = []

    def flush() -> None:
        dec = decode_all(run.model, [run.vocabs.source.encode(s) for s in pending], cfg)
        for toks_in, ids, att in zip(pending, dec.ids, dec.attention):
            toks = run.vocabs.target.decode(ids)
            outputs.append(detokenize(toks, tgt_kind))
            if write is not None:
                write(outputs[-1] + "\n")
            if attention_dir is not None:
                stem = Path(attention_dir) / f"{len(outputs):05d}"
                plot_attention([(toks_in, toks, att)], stem.with_suffix(".png"), columns=1)
                atomic_json(stem.with_suffix(".json"), {"source": list(toks_in), "output": toks + ["</s>"],
                                                        "weights": att.round(decimals=5).tolist()})
        pending.clear()

    for where, toks in sources:
        if not toks:
            raise UserError(f"{where}: empty after tokenisation ({src_kind} tokens)")
        pending.append(toks)
        if len(pending) >= cfg.batch_size:
            flush()
    if pending:
        flush()
    return outputs


__all__ = ["StackConfig", "Seq2SeqModelConfig", "Seq2Seq", "Attention", "Encoded", "DecoderState", "ObjectiveConfig",
           "Buckets", "Seq2SeqTask", "DecodeConfig", "decode", "decode_all", "length_limits", "Seq2SeqDataConfig",
           "Seq2SeqConfig", "prepare_data", "load_split", "evaluate_pairs", "pairs_loss", "plot_attention", "train",
           "LoadedRun", "load_run", "evaluate_run", "translate", "build_model", "trim"]
