"""Issue 20: the pretraining objectives (span, UL2's mixture of denoisers, prefix LM), UL2's mode
tokens in the tokenizer, `t5kit pretrain --objective ul2` training and resuming, --show-examples."""

import json
import os

import numpy as np
import pytest
from test_pretrain import _losses, _pretrain_args, corpus, kill9_after_checkpoint  # noqa: F401 (corpus: fixture)
from test_spans import _rebuild

from t5kit.cli import main
from t5kit.data.objectives import MODE_TOKENS, UL2, build_objective, parse_rates
from t5kit.data.pretraining import DataConfig, SpanCorruptionBatches
from t5kit.data.spans import noise_and_spans, random_spans_helper
from t5kit.data.tokenizer import Tokenizer

SENTINEL0 = 32099
MODES = dict(zip(MODE_TOKENS, (32100, 32101, 32102)))  # appended after the sentinels, as transformers appends them
RECORD_KEYS = ["denoiser", "mode", "rate", "mean_span", "inputs", "targets", "inputs_text", "targets_text",
               "noise_tokens", "kept_tokens", "spans"]


def _ul2(inputs=512, targets=None, rates=None):
    return build_objective("ul2", inputs, targets, rates, first_sentinel=SENTINEL0, eos=1, mode_ids=MODES,
                           sentinels=100)


def _mask_lengths(d, n):
    """(inputs, targets, spans) of n raw tokens corrupted by denoiser d, mode token not counted."""
    noise, spans = noise_and_spans(n, d.rate, d.mean_span)
    return n - noise + spans + 1, noise + spans + 1, spans


def _is_sentinel(ids):
    return (np.asarray(ids) > SENTINEL0 - 100) & (np.asarray(ids) <= SENTINEL0)


@pytest.mark.parametrize("length", [128, 512])
def test_denoiser_statistics_follow_seqio_arithmetic(length):
    """Over 3,000 examples (500 per R / X denoiser, segments of every length up to the denoiser's
    raw length): exactly seqio's noise count round(n r) and span count round(noise / mu)
    (`random_spans_noise_mask`), one of T5's 100 sentinels per span, noise density r over all,
    every segment rebuilt from inputs and targets, and no example longer than the lengths fitted to
    the inputs length (at 128, X3's and X4's noise rounds to less than half a mean span, still 1 span)."""
    rng = np.random.default_rng(0)
    for d in _ul2(length).denoisers:
        if d.mean_span is None:
            continue
        noise_total = raw_total = 0
        for k in range(500):
            n = d.raw_length if k % 2 else int(rng.integers(2, d.raw_length + 1))  # full segments and tails
            raw = rng.integers(3, 32000, size=n)
            inputs, targets, info = d.corrupt(raw, np.random.default_rng([7, k]))
            noise = min(max(round(n * d.rate), 1), n - 1)
            assert info["noise_tokens"] == noise and info["kept_tokens"] == n - noise, (d.name, n, info)
            assert info["spans"] == max(round(noise / d.mean_span), 1), (d.name, n, info)
            assert inputs[0] == MODES[d.mode] and not (inputs[1:] == MODES[d.mode]).any()  # the mode token first
            assert _is_sentinel(inputs).sum() == _is_sentinel(targets).sum() == info["spans"] <= 100
            assert _rebuild(inputs[1:].tolist(), targets.tolist(), SENTINEL0) == raw.tolist()
            assert len(inputs) <= d.inputs_length <= length and len(targets) <= d.targets_length
            if n == d.raw_length:
                assert (len(inputs), len(targets)) == (d.inputs_length, d.targets_length)
            noise_total, raw_total = noise_total + info["noise_tokens"], raw_total + n
        assert noise_total / raw_total == pytest.approx(d.rate, abs=0.003), d.name  # each count is rounded


def test_prefix_lm_targets_hold_no_sentinel_and_are_a_quarter_on_average():
    """S (ul2) and prefix-lm: the targets are the segment's last t tokens, t uniform on 1..n/2 (a
    quarter of the segment on average), no sentinel anywhere; [S2S] first in ul2, no mode token in
    prefix-lm."""
    s = {d.name: d for d in _ul2().denoisers}["S"]
    plain = build_objective("prefix-lm", 512, first_sentinel=SENTINEL0, eos=1).denoisers[0]
    assert (plain.name, plain.mode, s.mode) == ("S", None, "[S2S]")
    assert (plain.raw_length, plain.inputs_length, s.raw_length, s.inputs_length) == (512, 512, 511, 512)
    rng = np.random.default_rng(1)
    for d in (s, plain):
        shares = []
        for k in range(3000):
            raw = rng.integers(3, 32000, size=d.raw_length)
            inputs, targets, info = d.corrupt(raw, np.random.default_rng([3, k]))
            body = inputs[1:] if d.mode else inputs
            assert d.mode is None or inputs[0] == MODES["[S2S]"]
            assert not _is_sentinel(inputs).any() and not _is_sentinel(targets).any()
            assert not np.isin(targets, list(MODES.values())).any() and targets[-1] == 1 and body[-1] == 1
            assert body[:-1].tolist() + targets[:-1].tolist() == raw.tolist()
            t = info["noise_tokens"]
            assert 1 <= t <= len(raw) // 2 and len(targets) == t + 1 and info["spans"] == 1
            assert len(inputs) <= d.inputs_length and len(targets) <= d.targets_length
            shares.append(t / len(raw))
        assert np.mean(shares) == pytest.approx(0.25, abs=0.01) and max(shares) > 0.45


@pytest.mark.parametrize("inputs, targets", [(32, None), (32, 12), (128, 29), (512, None), (512, 114), (512, 64)])
def test_lengths_fit_seq_and_decoder_lengths(inputs, targets):
    """Each denoiser's raw length is the longest whose examples fit both lengths and T5's 100
    sentinels: random_spans_helper's (inputs less the mode token), shortened only while an example
    (counted as the noise mask counts) would exceed a length or need more sentinels."""
    obj = _ul2(inputs, targets)
    for d in obj.denoisers:
        assert d.inputs_length <= inputs and (targets is None or d.targets_length <= targets)
        if d.mean_span is None:
            continue
        helper = random_spans_helper(inputs - 1, d.rate, d.mean_span)[0]
        assert d.raw_length <= helper
        ins, tgt, spans = _mask_lengths(d, d.raw_length)
        assert (ins + 1, tgt) == (d.inputs_length, d.targets_length) and spans <= 100
        if d.raw_length < helper:  # one more raw token would make a longer example or need another sentinel
            ins, tgt, spans = _mask_lengths(d, d.raw_length + 1)
            assert ins + 1 > inputs or (targets is not None and tgt > targets) or spans > 100
    assert obj.segment_length == max(d.raw_length for d in obj.denoisers)
    assert obj.targets_length == max(d.targets_length for d in obj.denoisers) <= (targets or inputs)
    span = build_objective("span", inputs, first_sentinel=SENTINEL0)
    assert (span.segment_length, span.targets_length) == random_spans_helper(inputs)  # today's span corruption


def test_mixing_rates():
    """Default: the paper's uniform mixture over the seven; --denoiser-rates weights by name, and a
    denoiser of weight 0 is never drawn nor sizes the segments."""
    obj = _ul2()
    rng = np.random.default_rng(0)
    names = [obj.pick(rng).name for _ in range(7000)]
    assert [d.name for d in obj.denoisers] == [d.name for d in UL2]
    for name in set(names):
        assert names.count(name) / 7000 == pytest.approx(1 / 7, abs=0.015), name
    obj = _ul2(rates=parse_rates(["R1=1", "S=3"]))
    assert [d.name for d in obj.denoisers] == ["R1", "S"] and obj.rates == (0.25, 0.75)
    names = [obj.pick(rng).name for _ in range(4000)]
    assert names.count("S") / 4000 == pytest.approx(0.75, abs=0.03)
    assert obj.segment_length == 567  # R1's; X4 (1004) is not drawn
    for bad in (["Q1=1"], ["R1"], ["R1=-1"], ["R1=x"], ["R1=0"], ["R1=1", "R1=2"]):
        with pytest.raises(ValueError, match="--denoiser-rates"):
            parse_rates(bad)
    with pytest.raises(ValueError, match="applies to --objective ul2"):
        build_objective("span", 512, rates={"R1": 1.0}, first_sentinel=SENTINEL0)
    with pytest.raises(ValueError, match="targets length 2 leave no room for denoiser R1"):
        _ul2(32, 2)


def test_mode_tokens_join_the_tokenizer_and_its_export(corpus, tmp_path):  # noqa: F811
    """Added after every id (the sentinels keep theirs), parsed in task text, text in corpus text,
    and kept by save_pretrained / from_pretrained and in tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer
    tok = Tokenizer.from_pretrained(corpus / "tok")
    n, sentinel, fingerprint = len(tok), tok.sentinel_id(0), tok.fingerprint()
    ids = tok.add_special_tokens(MODE_TOKENS)
    assert ids == [n, n + 1, n + 2] and len(tok) == n + 3 and tok.sentinel_id(0) == sentinel
    assert tok.add_special_tokens(["[NLG]"]) == [n + 1] and len(tok) == n + 3  # present already
    assert tok.fingerprint() == fingerprint  # token stores stay valid: corpus text never holds them
    text = "[NLG] the day <extra_id_0> night"
    assert tok.encode(text)[0] == n + 1 and n + 1 not in tok.encode(text, parse_special=False)
    assert tok.decode(tok.encode(text), skip_special_tokens=False).startswith("[NLG] ")
    tok.check_model_vocab(256)
    tok.save_pretrained(tmp_path / "out")
    again = Tokenizer.from_pretrained(tmp_path / "out")
    assert len(again) == n + 3 and again.encode(text) == tok.encode(text) and again.sentinel_id(0) == sentinel
    hf = HFTokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert [hf.token_to_id(t) for t in MODE_TOKENS] == ids and hf.token_to_id("<extra_id_0>") == sentinel
    os.remove(tmp_path / "out" / "spiece.model")  # tokenizer.json alone: the same ids
    alone = Tokenizer.from_pretrained(tmp_path / "out")
    assert alone.kind == "tokenizers" and len(alone) == n + 3 and alone.sentinel_id(0) == sentinel
    assert alone.encode(text) == tok.encode(text)
    with pytest.raises(ValueError, match="ByT5"):
        Tokenizer.byt5().add_special_tokens(MODE_TOKENS)


def _store_batches(corpus, tmp_path, objective_name, **kw):  # noqa: F811
    from t5kit.data.store import TokenStore, build_token_store
    tok = Tokenizer.from_pretrained(corpus / "tok")
    modes = dict(zip(MODE_TOKENS, tok.add_special_tokens(MODE_TOKENS)))
    obj = build_objective(objective_name, 64, None, first_sentinel=tok.sentinel_id(0), eos=tok.eos_id, mode_ids=modes)
    build_token_store([str(corpus / "c.txt")], tok, str(tmp_path / "store"), progress=False)
    segments = TokenStore(str(tmp_path / "store"), tok).segments(obj.segment_length)
    make = lambda **k: SpanCorruptionBatches(segments, DataConfig(inputs_length=64), tok.sentinel_id(0), 8,
                                             objective=obj, **{**kw, **k})
    return make, obj, modes


def test_ul2_batches_pack_with_mode_tokens_first_and_resume_exactly(corpus, tmp_path):  # noqa: F811
    make, obj, modes = _store_batches(corpus, tmp_path, "ul2")
    it = make()
    batches = [next(it) for _ in range(6)]
    seen = set()
    for b in batches:
        assert b["input_ids"].shape == (8, 64) and b["labels"].shape == (8, obj.targets_length)
        for r in range(8):
            for k in range(1, b["segment_ids"][r].max() + 1):
                inputs = b["input_ids"][r][b["segment_ids"][r] == k]
                assert inputs[0] in modes.values() and inputs[-1] == 1  # whole examples, mode token first
                seen.add(int(inputs[0]))
    assert seen == set(modes.values())
    again = make()
    again.load_state({"epoch": 0, "position": 0})
    for _ in range(2):
        next(again)
    state = again.state()
    resumed = make()
    resumed.load_state(state)
    want = [next(again) for _ in range(2)]
    assert all(np.array_equal(w[key], g[key]) for w, g in zip(want, [next(resumed) for _ in range(2)]) for key in w)
    r1 = make(rank=1, world=2)  # an example is a function of (seed, epoch, segment) alone: the same on any rank
    index = int(r1._order(0)[0])
    assert all(np.array_equal(a, b) for a, b in zip(r1.example(0, index), make().example(0, index)))


def _show(corpus, tmp_path, capsys, *extra):  # noqa: F811
    args = _pretrain_args(corpus, tmp_path / "show", 2, list(extra))
    assert main(args) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_show_examples_prints_json_lines_and_trains_nothing(corpus, tmp_path, capsys):  # noqa: F811
    rows = _show(corpus, tmp_path, capsys, "--objective", "ul2", "--show-examples", "40")
    assert len(rows) == 40 and all(list(r) == RECORD_KEYS for r in rows)
    assert not (tmp_path / "show" / "checkpoints").exists() and not (tmp_path / "show" / "final").exists()
    modes = {d.name: d.mode for d in UL2}
    assert {r["denoiser"] for r in rows} == set(modes)
    tok = Tokenizer.from_pretrained(corpus / "tok")
    tok.add_special_tokens(MODE_TOKENS)
    for r in rows:
        assert r["mode"] == modes[r["denoiser"]] and r["inputs"][0] == tok.encode(r["mode"], add_eos=False)[0]
        assert r["inputs_text"].startswith(r["mode"] + " ") and r["inputs"][-1] == r["targets"][-1] == 1
        if r["denoiser"] == "S":
            assert r["mean_span"] is None and r["spans"] == 1 and r["noise_tokens"] == len(r["targets"]) - 1
        else:
            assert r["noise_tokens"] + r["kept_tokens"] == len(r["inputs"]) + len(r["targets"]) - 2 * r["spans"] - 3
    span = _show(corpus, tmp_path, capsys, "--show-examples", "2")
    assert [(r["denoiser"], r["mode"], r["rate"], r["mean_span"]) for r in span] == [("span", None, 0.15, 3.0)] * 2
    plain = _show(corpus, tmp_path, capsys, "--objective", "prefix-lm", "--show-examples", "3")
    assert all(r["denoiser"] == "S" and r["mode"] is None for r in plain)


@pytest.mark.parametrize("flags, message", [
    (["--objective", "bert"], "--objective 'bert': expected one of span, ul2, prefix-lm"),
    (["--objective", "ul2", "--denoiser-rates", "Z=1"], "--denoiser-rates 'Z=1': expected NAME=WEIGHT"),
    (["--denoiser-rates", "R1=1"], "--denoiser-rates applies to --objective ul2, not span"),
])
def test_bad_objective_flags_are_named(corpus, tmp_path, capsys, flags, message):  # noqa: F811
    assert main(_pretrain_args(corpus, tmp_path / "bad", 2, flags)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_ul2_trains_and_resumes_exactly_after_kill9(corpus, tmp_path):  # noqa: F811
    """--objective ul2: the loss falls, the export's tokenizer has the mode tokens, and a run killed
    (SIGKILL) after its step-2 checkpoint resumes with the uninterrupted run's losses."""
    flags = ["--objective", "ul2", "--lr", "3e-3"]
    full = tmp_path / "full"
    assert main(_pretrain_args(corpus, full, 8, flags)) == 0
    ref = _losses(full)
    assert np.mean([ref[7], ref[8]]) < np.mean([ref[1], ref[2]]) - 0.5, ref
    tok = Tokenizer.from_pretrained(full / "final")
    assert tok.encode("[NLU] [NLG] [S2S]", add_eos=False) == list(range(len(tok) - 3, len(tok)))
    run = tmp_path / "killed"
    kill9_after_checkpoint(_pretrain_args(corpus, run, 8, flags), run, 2, 8)
    assert main(_pretrain_args(corpus, run, 8, [*flags, "--resume"])) == 0
    got = _losses(run)
    for step in range(3, 9):
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])
