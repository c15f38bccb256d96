"""Names tf.data keeps under ``tf.data.experimental``, so ported code finds them here too."""

from feedline.dataset import AUTOTUNE, INFINITE_CARDINALITY, UNKNOWN_CARDINALITY

__all__ = ["AUTOTUNE", "INFINITE_CARDINALITY", "UNKNOWN_CARDINALITY"]
