"""Generation parity with transformers.generate, cached vs uncached, sampling, streaming, bad args;
outputs independent of the GPU's sync schedule (issue 17)."""

import pytest
import torch
from conftest import COPY_WORDS, EOS_WITHIN, copy_batch, eos_model, load_hf, padded_batch

import t5kit
from t5kit.data.tokenizer import Tokenizer
from t5kit.inference.generate import generate, generate_uncached, stream
from t5kit.inference.generation import ban_repeated_ngrams

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


GPU_SCHEDULE = [  # eos_model rows end within EOS_WITHIN steps, at different ones
    {},
    {"repetition_penalty": 1.4, "no_repeat_ngram_size": 2},
    {"do_sample": True, "top_k": 0, "temperature": 1.5, "num_return_sequences": 3},
    {"do_sample": True, "top_p": 0.8, "min_new_tokens": 2},
    {"num_beams": 3, "num_return_sequences": 2},
]


@pytest.mark.parametrize("kw", GPU_SCHEDULE)
def test_outputs_do_not_depend_on_the_sync_schedule(kw):
    """On GPU finished rows leave every engine.SYNC_EVERY steps and keep decoding until then; on CPU
    at once. Issue 17: sampling drew for the finished rows too, so the same seed gave other samples
    on GPU. Every row draws its own uniforms now, the same on either schedule (and widths match:
    no trailing pad columns)."""
    model, ids, mask = eos_model()
    runs = [generate(model, ids, mask, max_new_tokens=40, sync_every=s, generator=torch.Generator().manual_seed(3),
                     **kw) for s in (1, 16)]
    assert runs[0].shape[1] <= EOS_WITHIN and len({int((row != 0).sum()) for row in runs[0]}) > 1
    assert torch.equal(runs[0], runs[1]), kw


@pytest.mark.parametrize("kw", GPU_SCHEDULE[:4])
def test_stream_yields_no_token_after_a_rows_eos(kw):
    """A row's last streamed token is its EOS, on every device (issue 17: on GPU the stream went on
    yielding finished rows until the next sync), and the stream gives generate's tokens."""
    model, ids, mask = eos_model()
    full = generate(model, ids, mask, max_new_tokens=40, generator=torch.Generator().manual_seed(3), **kw)
    got, ended = torch.zeros_like(full), set()
    for step, (rows, tokens) in enumerate(stream(model, ids, mask, torch.Generator().manual_seed(3),
                                                 max_new_tokens=40, **kw)):
        assert not ended & set(rows.tolist()), (step, ended)
        ended |= {r for r, t in zip(rows.tolist(), tokens.tolist()) if t == 1}
        got[rows, step] = tokens
    assert ended == set(range(len(full))) and torch.equal(got, full)


def test_inverse_cdf_sampling_draws_the_distribution():
    """One uniform per row: evenly spaced uniforms give each token its probability's share of them
    (to one uniform), and a token of probability 0 is never drawn, at the extreme uniforms either."""
    from t5kit.inference.generation import sample  # new in issue 17: the rest of this file runs on the old code

    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.25, 0.25, 0.25, 0.25]])
    k = 10_000
    noise = torch.cat([(torch.arange(k) + 0.5) / k, torch.tensor([0.0, 1 - 2 ** -24])])
    tokens = torch.stack([sample(p.expand(len(noise), -1), noise) for p in probs])  # (3, k + 2)
    for p, t in zip(probs, tokens):
        share = torch.bincount(t[:k], minlength=5) / k
        assert (share - p).abs().max() <= 1 / k and (p[t] > 0).all(), (p, share)


@pytest.mark.hf
def test_no_repeat_ngram_on_the_device_equals_transformers():
    """ban_repeated_ngrams works on the device (no host sync per step); the bans are transformers'."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4):
        for t in range(1, 14):
            history, scores = torch.randint(0, 5, (6, t), generator=gen), torch.randn(6, 9, generator=gen)
            want = transformers.NoRepeatNGramLogitsProcessor(n)(history, scores.clone())
            assert torch.equal(ban_repeated_ngrams(history, scores, n), want), (n, t)


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
