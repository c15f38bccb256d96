"""AUTOTUNE: the tuner reads stage metrics and writes knobs (runtime/tunable.py), nothing else."""
