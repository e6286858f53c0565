"""The training loop and what makes it scale: the loop for pretraining and fine-tuning (loop.py),
its loss (loss.py), optimizers, schedules and fp32 masters (optim.py), checkpoints that resume
under any layout (checkpoint.py), and torchrun, DDP / FSDP2 / tensor parallelism (parallel.py).

May import t5kit.model and t5kit.data.
"""
