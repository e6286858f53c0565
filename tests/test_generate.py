"""Generation parity with transformers.generate, cached vs uncached, sampling, streaming, bad args."""

import pytest
import torch
from conftest import COPY_WORDS, copy_batch, load_hf, padded_batch

import t5kit
from t5kit.data.tokenizer import Tokenizer
from t5kit.inference.generate import generate_uncached, stream

transformers = pytest.importorskip("transformers")


def _hf_generate(ref, ids, mask, **kw):
    out = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)[:, 1:]
    after_eos = (out == 1).long().cumsum(1) - (out == 1).long() > 0
    return out.masked_fill(after_eos, 0)  # transformers' beam search fills with EOS after the end


def _same(a, b):
    w = max(a.shape[1], b.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, w - x.shape[1]))  # noqa: E731
    return torch.equal(pad(a), pad(b))


@pytest.mark.hf
@pytest.mark.parametrize("name", ["t5-v1_0", "t5-v1_1", "t5-v1_1-hf5", "mt5", "umt5-released", "byt5", "odd-shape"])
def test_greedy_equals_transformers(hf_dir, name):
    folder = hf_dir(name)
    model, ref = t5kit.T5.from_pretrained(folder), load_hf(folder)
    ids, mask = padded_batch(model.config.vocab_size, lengths=(40, 25, 9, 3))
    for kw in ({}, {"no_repeat_ngram_size": 2}, {"repetition_penalty": 1.3, "min_new_tokens": 4}):
        ours = model.generate(ids, mask, max_new_tokens=24, **kw)
        assert _same(ours, _hf_generate(ref, ids, mask, max_new_tokens=24, **kw)), (name, kw)


@pytest.mark.hf
def test_more_decoder_than_encoder_layers(hf_dir):
    """transformers 5.23's generate raises IndexError here; the uncached loop is the oracle."""
    model = t5kit.T5.from_pretrained(hf_dir("umt5"))
    assert model.config.num_decoder_layers > model.config.num_layers
    ids, mask = padded_batch(model.config.vocab_size, lengths=(30, 12))
    assert torch.equal(model.generate(ids, mask, max_new_tokens=20, no_repeat_ngram_size=2),
                       generate_uncached(model, ids, mask, 20, no_repeat_ngram_size=2))


def _copy_inputs(n=6, seed=3):
    tok = Tokenizer.byt5()
    src, tgt = copy_batch(torch.Generator().manual_seed(seed), n)
    ids, mask = tok.encode_batch(src)
    return tok, src, tgt, ids, mask


def test_copy_model_learned_and_cached_equals_uncached(copy_model_dir):
    model = t5kit.T5.from_pretrained(copy_model_dir)
    tok, src, tgt, ids, mask = _copy_inputs(8)
    out = model.generate(ids, mask, max_new_tokens=24)
    texts = tok.decode_batch(out)
    assert sum(a == b for a, b in zip(texts, tgt)) >= 6, list(zip(texts, tgt))
    assert len({int((row != 0).sum()) for row in out}) > 1  # rows end at different lengths
    assert torch.equal(out, generate_uncached(model, ids, mask, 24))


def _beam_scores(model, ids, mask, outputs, repeat, length_penalty):
    """Length-normalised log-prob of each output, as beam search ranks it."""
    ids, mask = ids.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
    start = torch.zeros(outputs.shape[0], 1, dtype=torch.long)
    with torch.no_grad():
        logp = model(ids, torch.cat([start, outputs[:, :-1]], 1), mask).log_softmax(-1)
    tok_lp = logp.gather(-1, outputs[..., None]).squeeze(-1)
    valid = outputs != 0
    return (tok_lp * valid).sum(1) / valid.sum(1).float() ** length_penalty


@pytest.mark.hf
@pytest.mark.parametrize("length_penalty", [0.6, 1.0, 2.0])
@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_search_equals_transformers(copy_model_dir, length_penalty, early_stopping):
    model, ref = t5kit.T5.from_pretrained(copy_model_dir), load_hf(copy_model_dir)
    _, _, _, ids, mask = _copy_inputs(6, seed=7)
    kw = dict(num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=2,
              max_new_tokens=20)
    ours, theirs = model.generate(ids, mask, **kw), _hf_generate(ref, ids, mask, **kw)
    assert (ours == 1).any(1).float().mean() >= 0.5  # most hypotheses really end in EOS
    if not _same(ours, theirs):  # a different winner must be a near-tie
        w = max(ours.shape[1], theirs.shape[1])
        pad = lambda x: torch.nn.functional.pad(x, (0, w - x.shape[1]))  # noqa: E731
        a = _beam_scores(model, ids, mask, pad(ours), 2, length_penalty)
        b = _beam_scores(model, ids, mask, pad(theirs), 2, length_penalty)
        differ = (pad(ours) != pad(theirs)).any(1)
        assert (a - b)[differ].abs().max() < 1e-4


def test_sampling_top_k_1_equals_greedy(copy_model_dir):
    model = t5kit.T5.from_pretrained(copy_model_dir)
    _, _, _, ids, mask = _copy_inputs(5)
    greedy = model.generate(ids, mask, max_new_tokens=20)
    sampled = model.generate(ids, mask, max_new_tokens=20, do_sample=True, top_k=1, temperature=0.7,
                             generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, sampled)


def test_sampling_is_seeded_and_top_p_restricts(copy_model_dir):
    model = t5kit.T5.from_pretrained(copy_model_dir)
    _, _, _, ids, mask = _copy_inputs(4)
    run = lambda s, **kw: model.generate(ids, mask, max_new_tokens=16, do_sample=True, top_k=0,  # noqa: E731
                                         generator=torch.Generator().manual_seed(s), **kw)
    assert torch.equal(run(5, temperature=2.0), run(5, temperature=2.0))
    assert torch.equal(run(5, top_p=1e-6), model.generate(ids, mask, max_new_tokens=16))  # nucleus of one


def test_stream_yields_generate_tokens(copy_model_dir):
    model = t5kit.T5.from_pretrained(copy_model_dir)
    _, _, _, ids, mask = _copy_inputs(4)
    full = model.generate(ids, mask, max_new_tokens=20)
    got = torch.zeros_like(full)
    for step, (rows, tokens) in enumerate(stream(model, ids, mask, max_new_tokens=20)):
        got[rows, step] = tokens
    assert torch.equal(got, full)


def test_int8_agrees_with_fp32(copy_model_dir):
    from t5kit.inference.cpu import quantize_int8
    model = t5kit.T5.from_pretrained(copy_model_dir)
    tok, src, tgt, ids, mask = _copy_inputs(12, seed=11)
    ref = model.generate(ids, mask, max_new_tokens=24)
    with torch.no_grad():
        dec = torch.cat([torch.zeros(len(ids), 1, dtype=torch.long), ref[:, :-1]], 1)
        logits_ref = model(ids, dec, mask)
        q = quantize_int8(model)
        logits_q = q(ids, dec, mask)
    out = q.generate(ids, mask, max_new_tokens=24)
    assert (out == ref)[ref != 0].float().mean() > 0.95
    assert (logits_q - logits_ref).abs().max() < 0.1 * logits_ref.abs().max()


@pytest.mark.parametrize("kw, match", [
    (dict(num_beams=0), "num_beams=0: expected an integer >= 1"),
    (dict(do_sample=True, top_p=1.5), "top_p=1.5: expected a value in"),
    (dict(do_sample=True, top_p=0.0), "top_p=0.0"),
    (dict(do_sample=True, temperature=0.0), "temperature=0.0: expected > 0"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3"),
])
def test_bad_generation_arguments(copy_model_dir, kw, match):
    model = t5kit.T5.from_pretrained(copy_model_dir)
    with pytest.raises(ValueError, match=match):
        model.generate(torch.ones(1, 3, dtype=torch.long), **kw)


def test_copy_words_are_bytes():
    assert all(w.isascii() for w in COPY_WORDS)
