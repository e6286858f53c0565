"""One token at a time, fast: GenerationConfig and logits processors (generation.py), the decode
step, eager or static and captured (engine.py), greedy / sampling / streaming and text batching
(generate.py), beam search (beam.py), and CPU inference weights, packed or int8 (cpu.py).

May import t5kit.model and t5kit.data.
"""
