"""Metrics equal sacrebleu and rouge-score called directly, with one reference or several; T5's answer
normalisation for exact match, string equality for accuracy."""

import pytest

from t5kit.jobs.metrics import compute, normalize_answer

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

PREDS = ["Au commencement, Dieu créa le ciel.", "La terre était vide et informe", "Il dit: que la lumière soit!",
         "running dogs were barking.\nThey ran home.", ""]
REFS = ["Au commencement, Dieu créa les cieux et la terre.", "La terre était informe et vide",
        "Dieu dit: Que la lumière soit!", "The dogs ran and barked.\nThen they went home.", "Et la lumière fut."]


def test_bleu_chrf_equal_sacrebleu():
    got = compute(["bleu", "chrf"], PREDS, REFS)
    assert got["bleu"] == sacrebleu.corpus_bleu(PREDS, [REFS]).score
    assert got["chrf"] == sacrebleu.corpus_chrf(PREDS, [REFS]).score
    assert 0 < got["bleu"] < 100 and "nrefs:1" in got["sacrebleu_signature"] and "chrf: nrefs:1|case:mixed|eff:yes|nc:6" in got["sacrebleu_signature"]


def test_rouge_equals_rouge_score_with_stemming_and_lsum_on_newlines():
    got = compute(["rouge"], PREDS, REFS)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        want = 100 * sum(scorer.score(r, p)[key].fmeasure for p, r in zip(PREDS, REFS)) / len(PREDS)
        assert got[key] == pytest.approx(want, abs=1e-12)
    # stemming: "running dogs ... barking" matches "dogs ran ... barked" better than without it
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False).score(REFS[3], PREDS[3])["rouge1"].fmeasure
    assert scorer.score(REFS[3], PREDS[3])["rouge1"].fmeasure > plain
    # Lsum sees the newline as a sentence boundary, rougeL does not
    assert scorer.score(REFS[3], PREDS[3])["rougeLsum"].fmeasure != scorer.score(REFS[3], PREDS[3])["rougeL"].fmeasure


@pytest.mark.parametrize("text, want", [
    ("The Cat", "cat"), ("  an  apple, a pear.  ", "apple pear"), ("Theatre", "theatre"), ("A-B!c", "abc"),
    ("acceptable", "acceptable"), ("\tUNACCEPTABLE\n", "unacceptable"), ("", ""),
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_exact_match_normalises_and_accuracy_is_string_equality():
    """exact_match: T5's SQuAD normalisation; accuracy: T5's `accuracy`, raw string equality."""
    preds = ["The answer.", "acceptable", "unacceptable", "Paris", "Lyon"]
    refs = ["answer", "Acceptable!", "acceptable", "paris ", "Lyon"]
    got = compute(["exact_match", "accuracy"], preds, refs)
    assert got == {"exact_match": 80.0, "accuracy": 20.0}
    assert compute(["exact_match"], ["a lion"], [["tiger", "Lion"]])["exact_match"] == 100.0  # best reference
    assert compute(["accuracy"], ["Lion", "lion"], [["tiger", "Lion"], ["Lion"]])["accuracy"] == 50.0


MULTI = [[r, p] for r, p in zip(REFS, ["In the beginning God created the heaven.", "La terre était vide et informe",
                                       "Il dit: que la lumière soit!", "The dogs were barking.", "La lumière fut."])]


def test_bleu_chrf_take_several_references_as_sacrebleu_streams():
    got = compute(["bleu", "chrf"], PREDS, MULTI)
    streams = [[m[0] for m in MULTI], [m[1] for m in MULTI]]
    assert got["bleu"] == sacrebleu.corpus_bleu(PREDS, streams).score
    assert got["chrf"] == sacrebleu.corpus_chrf(PREDS, streams).score
    assert got["bleu"] > sacrebleu.corpus_bleu(PREDS, streams[:1]).score  # the second references count
    assert "bleu: nrefs:2|" in got["sacrebleu_signature"] and "chrf: nrefs:2|" in got["sacrebleu_signature"]


def test_fewer_references_are_padded_by_sacrebleus_rule():
    """An example with fewer references is padded with None, which sacrebleu drops: the same score as
    repeating its reference (a repeated reference changes neither n-gram clipping, the closest
    reference length nor chrF's best reference); the signature says nrefs:var."""
    short = [MULTI[0], MULTI[1][:1], MULTI[2], MULTI[3][:1], MULTI[4]]
    got = compute(["bleu", "chrf"], PREDS, short)
    repeated = compute(["bleu", "chrf"], PREDS, [rs * 2 if len(rs) == 1 else rs for rs in short])
    assert (got["bleu"], got["chrf"]) == (repeated["bleu"], repeated["chrf"])
    assert got["bleu"] == sacrebleu.corpus_bleu(PREDS, [[r[0] for r in short],
                                                        [r[1] if len(r) > 1 else None for r in short]]).score
    assert "bleu: nrefs:var|" in got["sacrebleu_signature"]


def test_rouge_takes_the_best_reference():
    got = compute(["rouge"], PREDS, MULTI)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        want = 100 * sum(max(scorer.score(r, p)[key].fmeasure for r in rs) for p, rs in zip(PREDS, MULTI)) / len(PREDS)
        assert got[key] == pytest.approx(want, abs=1e-12)


def test_bad_metric_and_lengths():
    with pytest.raises(ValueError, match="unknown metric 'blue': expected one of bleu, chrf"):
        compute(["blue"], ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        compute(["bleu"], ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        compute(["bleu"], [], [])
    with pytest.raises(ValueError, match=r"example 2: references \[\]: expected a string or a non-empty list"):
        compute(["bleu"], ["a", "b"], ["a", []])
