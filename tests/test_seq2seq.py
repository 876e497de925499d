"""The encoder-decoder, its attention and masking, greedy and beam decoding, metrics and batching."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rnnkit.data.pairs import BOS_ID, EOS_ID, PAD_ID, Pair, Vocab, encode_pairs
from rnnkit.errors import UserError
from rnnkit.metrics import sequence_metrics, translation_metrics
from rnnkit.tasks.decoding import beam_search, greedy_search, length_penalty, step_logprobs
from rnnkit.tasks.seq2seq import (
    NEVER,
    Buckets,
    DecodeConfig,
    ObjectiveConfig,
    Seq2Seq,
    Seq2SeqModelConfig,
    Seq2SeqTask,
    StackConfig,
    build_model,
    decode,
    length_limits,
)

ATTENTIONS = ("none", "additive", "multiplicative")


def tiny(attention="multiplicative", cell="lstm", dec_cell=None, layers=2, input_feeding=False, bidirectional=True,
         V_src=9, V_tgt=11, **kw):
    cfg = Seq2SeqModelConfig(embedding_size=6, encoder=StackConfig(cell=cell, hidden_size=5, num_layers=layers),
                             decoder=StackConfig(cell=dec_cell or cell, hidden_size=7, num_layers=layers),
                             bidirectional=bidirectional, attention=attention, input_feeding=input_feeding,
                             dropout=0.0, **kw)
    return Seq2Seq(V_src, V_tgt, cfg)


def batch(S=6, B=4, lengths=(6, 2, 4, 1), V=9):
    src = torch.randint(4, V, (S, B))
    lens = torch.tensor(lengths)
    for b in range(B):
        src[lens[b]:, b] = PAD_ID
    return src, lens


def step_logits(model, src, lens, tgt_in):
    state, out = model.start(src, lens), []
    for t in range(tgt_in.shape[0]):
        lg, state, _ = model.decode_step(tgt_in[t], state)
        out.append(lg)
    return torch.stack(out)


def greedy(model, src, lens, cfg):
    return greedy_search(model, src, lens, length_limits(lens, cfg), start=BOS_ID, end=EOS_ID, forbid=NEVER)


def beam(model, src, lens, cfg):
    return beam_search(model, src, lens, length_limits(lens, cfg), beam_size=cfg.beam_size, start=BOS_ID,
                       end=EOS_ID, forbid=NEVER, alpha=cfg.length_penalty)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("cells", [("lstm", "lstm"), ("gru", "lstm"), ("rnn", "gru_cho")])
def test_teacher_forced_forward_equals_step_by_step(attention, cells):
    model = tiny(attention, cells[0], cells[1]).double().eval()
    src, lens = batch()
    tgt_in = torch.randint(4, 11, (5, 4))
    logits, w = model(src, lens, tgt_in)
    assert logits.shape == (5, 4, 11)
    torch.testing.assert_close(logits, step_logits(model, src, lens, tgt_in), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attention", ("additive", "multiplicative"))
def test_attention_weights_are_a_distribution_over_valid_positions(attention):
    model = tiny(attention).double().eval()
    src, lens = batch()
    _, w = model(src, lens, torch.randint(4, 11, (5, 4)))
    assert w.shape == (4, 5, 6)  # (B, T, S)
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 5, dtype=torch.float64))
    for b, n in enumerate(lens.tolist()):
        assert bool((w[b, :, n:] == 0).all())
        assert bool((w[b, :, :n] > 0).all())


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("input_feeding", [False, True])
def test_padding_never_changes_a_prediction(attention, input_feeding):
    """A pair decoded alone and inside a padded batch gives the same logits (masks and lengths)."""
    model = tiny(attention, input_feeding=input_feeding).double().eval()
    src, lens = batch()
    tgt_in = torch.randint(4, 11, (5, 4))
    full, _ = model(src, lens, tgt_in)
    for b, n in enumerate(lens.tolist()):
        alone, _ = model(src[:n, b:b + 1], lens[b:b + 1], tgt_in[:, b:b + 1])
        torch.testing.assert_close(alone[:, 0], full[:, b], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("input_feeding", [False, True])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_beam_size_one_equals_greedy_exactly(attention, input_feeding, cell):
    model = tiny(attention, cell, input_feeding=input_feeding).eval()
    with torch.no_grad():  # a random model often ends at once; make it talk a little
        model.out.bias[EOS_ID] = model.out.bias.max() - 0.3
    src, lens = batch(S=7, B=6, lengths=(7, 3, 5, 1, 6, 2))
    cfg = DecodeConfig(beam_size=1, max_length_ratio=1.5, max_length_extra=3)
    g = greedy(model, src, lens, cfg)
    b = beam(model, src, lens, cfg)
    assert g.ids == b.ids and g.scores == b.scores
    assert any(len(x) > 0 for x in g.ids)
    for ga, ba in zip(g.attention, b.attention):
        assert (ga is None and ba is None) or torch.equal(ga, ba)


@torch.no_grad()
def sequence_logprob(model, src, lens, out):
    """log p(out </s> | src) by teacher forcing (one pair)."""
    tgt = torch.tensor([BOS_ID, *out, EOS_ID]).view(-1, 1)
    logp = step_logprobs(model(src, lens, tgt[:-1])[0][:, 0], torch.tensor(NEVER), EOS_ID,
                         torch.zeros(len(out) + 1, dtype=torch.bool))
    return float(logp.gather(1, tgt[1:]).sum())


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_finds_the_best_sequence_by_exhaustive_search(alpha):
    """With a beam wider than the whole search space, beam search returns the best length-normalised
    sequence of all (enumerated), for every sequence of a batch."""
    model = tiny("additive", V_tgt=6).eval()
    src, lens = batch(S=3, B=3, lengths=(3, 1, 2))
    cfg = DecodeConfig(beam_size=64, length_penalty=alpha, max_length_ratio=0.0, max_length_extra=3)
    got = beam(model, src, lens, cfg)
    non_eos = [t for t in range(6) if t not in (EOS_ID, PAD_ID, BOS_ID)]
    for b in range(3):
        s, n = src[:lens[b], b:b + 1], lens[b:b + 1]
        best = max((sequence_logprob(model, s, n, list(seq)) / float(length_penalty(torch.tensor(len(seq) + 1),
                                                                                       alpha)), list(seq))
                   for k in range(3) for seq in itertools.product(non_eos, repeat=k))
        assert got.ids[b] == best[1]
        assert math.isclose(got.scores[b], sequence_logprob(model, s, n, best[1]), rel_tol=1e-4)


def test_length_limit_and_output_lengths():
    model = tiny().eval()
    src, lens = batch()
    for k in (1, 3):
        out = decode(model, src, lens, DecodeConfig(beam_size=k, max_length_ratio=1.0, max_length_extra=1))
        for b, ids in enumerate(out.ids):
            assert len(ids) + 1 <= int(lens[b]) + 1
            assert EOS_ID not in ids
            assert out.attention[b].shape == (len(ids) + 1, int(lens[b]))
    with pytest.raises(UserError, match="beam-size"):
        decode(model, src, lens, DecodeConfig(beam_size=0))


def test_scheduled_sampling_feeds_the_models_own_tokens():
    model = tiny(layers=1).double().eval()
    src, lens = batch()
    tgt_in = torch.randint(4, 11, (5, 4))
    logits, _ = model(src, lens, tgt_in, sample_prob=1.0)
    own = tgt_in.clone()
    own[1:] = logits[:-1].argmax(-1)
    torch.testing.assert_close(logits, model(src, lens, own)[0], rtol=1e-12, atol=1e-12)
    task = Seq2SeqTask(ObjectiveConfig(scheduled_sampling=0.4, scheduled_sampling_steps=100))
    assert task.sample_prob() == 0.0
    task.trainer = type("T", (), {"step": 50})()
    assert task.sample_prob() == pytest.approx(0.2)
    task.trainer.step = 1000
    assert task.sample_prob() == pytest.approx(0.4)


def test_tied_and_shared_embeddings():
    m = tiny(tie_embeddings=True)
    assert m.out.weight is m.tgt_embedding.weight and m.proj is not None
    s = tiny(share_embeddings=True, V_src=11, V_tgt=11)
    assert s.src_embedding is s.tgt_embedding
    with pytest.raises(UserError, match="share_embeddings"):
        build_model(9, 11, Seq2SeqModelConfig(share_embeddings=True))
    with pytest.raises(UserError, match="attention"):
        build_model(9, 11, Seq2SeqModelConfig(attention="dot"))


def test_loss_counts_only_the_predicted_steps():
    model = tiny().double()
    pairs = [Pair(tuple("abc"), tuple("xy")), Pair(tuple("a"), tuple("xyzx"))]
    sv, tv = Vocab.build(p.source for p in pairs), Vocab.build(p.target for p in pairs)
    data = encode_pairs(pairs, sv, tv)
    assert data["tgt"][0].tolist() == [BOS_ID, *tv.encode("xy"), EOS_ID, PAD_ID, PAD_ID]
    loss, n = Seq2SeqTask().loss(model, data)
    assert n == 3 + 5
    each = [Seq2SeqTask().loss(model, {k: v[i:i + 1] for k, v in data.items()}) for i in range(2)]
    torch.testing.assert_close(loss, (each[0][0] * 3 + each[1][0] * 5) / 8)


def test_buckets_hold_every_pair_once_with_equal_source_lengths():
    pairs = [Pair(tuple("a" * (1 + i % 5)), tuple("b" * (1 + i % 3))) for i in range(53)]
    v = Vocab.build(p.source for p in pairs)
    data = encode_pairs(pairs, v, Vocab.build(p.target for p in pairs))
    bk = Buckets(data, 4, seed=1)
    seen = torch.cat(bk.batches).sort().values
    assert torch.equal(seen, torch.arange(53))
    for i in range(len(bk)):
        item = bk[i]
        assert 1 <= item["src"].shape[0] <= 4 and len(set(item["src_len"].tolist())) == 1
    assert [b.tolist() for b in Buckets(data, 4, seed=1).batches] == [b.tolist() for b in bk.batches]


def test_sequence_and_text_metrics():
    refs = [["AH", "B", "K"], ["T", "UW"]]
    m = sequence_metrics(refs, [["AH", "K"], ["T", "UW"]])
    assert m["exact_match"] == 0.5 and m["sequence_error_rate"] == 0.5
    assert m["token_error_rate"] == pytest.approx(1 / 5)
    assert sequence_metrics([["a", "b"]], [["c", "d", "e"]])["token_error_rate"] == pytest.approx(3 / 2)
    t = translation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert t["bleu"] == pytest.approx(100.0) and t["chrf"] == pytest.approx(100.0)
    assert translation_metrics(["the cat sat on the mat"], ["a dog"])["bleu"] < 10


def test_text_error_rates_equal_jiwer():
    jiwer = pytest.importorskip("jiwer")
    from rnnkit.metrics import text_metrics

    refs = ["12 345", "6789", "0 0 1", "ab  cd"]
    hyps = ["12 35", "16789", "0 0 1", "ab cx d"]
    m = text_metrics(refs, hyps)
    assert m["cer"] == pytest.approx(jiwer.cer(refs, hyps))
    assert m["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert m["seq_accuracy"] == pytest.approx(1 / 4)
