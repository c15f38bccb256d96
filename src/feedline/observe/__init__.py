"""Seeing what a pipeline does: stats, the bottleneck, AUTOTUNE's decisions."""
