"""Text-to-text metrics: BLEU and chrF (sacrebleu), ROUGE (rouge-score), exact match, accuracy.

Every score is on the 0-100 scale, as the T5 paper reports them (t5.evaluation.metrics). An
example's reference is a string, or a list of strings when the target field holds several.
- bleu / chrf: sacrebleu corpus scores with its defaults (13a tokenisation, exponential
  smoothing; chrF n=6, beta=2), against every reference of an example: sacrebleu takes one
  reference stream per reference position, and an example with fewer references than the most any
  example has is padded with None, which sacrebleu drops from that example (its rule for a
  variable number of references; the signature then says nrefs:var). The signature records the
  exact settings.
- rouge1 / rouge2 / rougeL / rougeLsum: rouge-score F-measure with the Porter stemmer, averaged
  over examples, against the best-scoring reference of each example (`RougeScorer.score_multi`);
  rougeLsum splits both texts into sentences at newlines (rouge-score's convention).
- exact_match: the share of predictions equal to a reference after T5's SQuAD answer
  normalisation (`normalize_answer`: lower case, no punctuation, no articles, single spaces;
  t5.evaluation.qa_utils.normalize_squad), the best over an example's references (T5's `squad`).
- accuracy: T5's `accuracy` (seqio t5.evaluation.metrics.accuracy, sklearn's accuracy_score): the
  share of predictions equal to the target as strings, without any normalisation; with several
  references, equal to one of them.
Needs the [eval] extra (sacrebleu, rouge-score); imported lazily.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

METRICS = ("bleu", "chrf", "rouge", "exact_match", "accuracy")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """T5's SQuAD normalisation.

    >>> normalize_answer("  The  Cat, sat on a mat! ")
    'cat sat on mat'
    """
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def check_metrics(names: Sequence[str]) -> list[str]:
    """Validate metric names and that their libraries import, before any heavy work."""
    for n in names:
        if n not in METRICS:
            raise ValueError(f"unknown metric {n!r}: expected one of {', '.join(METRICS)}")
    if {"bleu", "chrf"} & set(names):
        _eval_extra("sacrebleu")
    if "rouge" in names:
        _eval_extra("rouge_score.rouge_scorer")
    return list(names)


def _eval_extra(name: str):
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ValueError(f"metric needs {name.split('.')[0]}: pip install 't5kit[eval]'") from None


def compute(names: Sequence[str], predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """-> flat {key: score} for the asked metrics (rouge expands to ROUGE_KEYS), plus
    `sacrebleu_signature` when BLEU or chrF was asked. `references[i]` is a string, or a list of
    strings: example i's references (see the module's docstring for how each metric uses them)."""
    check_metrics(names)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no examples to score")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, rs in enumerate(refs):
        if not rs or not all(isinstance(r, str) for r in rs):
            raise ValueError(f"example {i + 1}: references {references[i]!r}: expected a string or a non-empty list "
                             f"of strings")
    out: dict = {}
    signatures = []
    if "bleu" in names or "chrf" in names:
        sacrebleu = _eval_extra("sacrebleu")
        streams = reference_streams(refs)
        for name, cls in (("bleu", sacrebleu.metrics.BLEU), ("chrf", sacrebleu.metrics.CHRF)):
            if name in names:
                metric = cls()
                out[name] = metric.corpus_score(list(predictions), streams).score
                signatures.append(f"{name}: {metric.get_signature()}")
        out["sacrebleu_signature"] = "; ".join(signatures)
    if "rouge" in names:
        scorer = _eval_extra("rouge_score.rouge_scorer").RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
        sums = dict.fromkeys(ROUGE_KEYS, 0.0)
        for pred, rs in zip(predictions, refs):
            # rougeLsum treats newlines as sentence boundaries; the other keys ignore them
            scores = scorer.score_multi(rs, pred)
            for k in ROUGE_KEYS:
                sums[k] += scores[k].fmeasure
        out.update({k: 100 * v / len(predictions) for k, v in sums.items()})
    if "exact_match" in names:
        out["exact_match"] = 100 * sum(max(normalize_answer(p) == normalize_answer(r) for r in rs)
                                       for p, rs in zip(predictions, refs)) / len(predictions)
    if "accuracy" in names:
        out["accuracy"] = 100 * sum(p in rs for p, rs in zip(predictions, refs)) / len(predictions)
    return out


def reference_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """Per-example reference lists -> sacrebleu's reference streams (stream k holds every example's
    k-th reference), an example with fewer references padded with None, which sacrebleu drops from
    that example (sacrebleu.metrics.base.Metric._cache_references).

    >>> reference_streams([["a", "b"], ["c"]])
    [['a', 'c'], ['b', None]]
    """
    n = max(len(rs) for rs in refs)
    return [[rs[k] if k < len(rs) else None for rs in refs] for k in range(n)]
