"""What a checkpoint is and how it runs a forward pass: T5Config and presets (config.py), the
attention kernels and relative-position buckets (attention.py), the T5 modules and the decode
cache (t5.py), Hugging Face checkpoints both ways (hf.py) and hub ids (hub.py).

Imports nothing of t5kit above it (only the stdlib helpers in t5kit/atomic.py).
"""
