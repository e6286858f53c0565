"""One module per job, each a function taking its config dataclass: pretrain.py, finetune.py,
evaluate.py, embed.py, demo.py; what they share (run directory, tokenizer and model preparation,
the training-loop flags) in common.py; the metrics in metrics.py.

May import t5kit.model, data, inference and training. The job functions are public as
`t5kit.pretrain` etc.; this package binds none of them, so its submodules keep their names.
"""
