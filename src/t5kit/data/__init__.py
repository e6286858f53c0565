"""Text in, batches out, as pure functions with an explicit RNG: tokenizers (tokenizer.py), corpus
and task readers (readers.py), token stores (store.py), seqio-exact span corruption (spans.py)
and its batches (pretraining.py), tokenised tasks with their cache (task_cache.py), batching and
mixtures (tasks.py), and the embedded public-domain corpus (embedded.py).

May import t5kit.model (hub resolution); nothing else of t5kit.
"""
