"""File formats: text lines (and file listing)."""
