"""Text in, batches out, as pure functions with an explicit RNG: tokenizers (tokenizer.py) over
their vocabulary backends (vocabularies.py), line and task readers (readers.py), pretraining
corpora (corpus.py), token stores (store.py) and Megatron's indexed files (megatron.py), segment
sources, blends and splits (sources.py), seqio-exact span corruption (spans.py), pretraining
objectives (objectives.py) and their batches (pretraining.py), tokenised tasks with their cache
(task_cache.py), batching and mixtures (tasks.py), and the embedded public-domain corpus
(embedded.py).

May import t5kit.model (hub resolution); nothing else of t5kit.
"""
