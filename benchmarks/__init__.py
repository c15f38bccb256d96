"""Side-by-side benchmarks of feedline against tf.data, the PyTorch DataLoader and Grain.

Run ``python -m benchmarks.run --help`` (or ``make bench`` / ``make bench-quick``); see README.md.
"""
