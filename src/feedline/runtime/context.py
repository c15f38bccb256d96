"""What every iterator of one pipeline run shares."""

from __future__ import annotations

from feedline.options import Options, ResolvedOptions


class IterContext:
    """Per-run settings, created once per top-level iterator and passed down to every node."""

    def __init__(self, options: Options | None = None) -> None:
        self.options = ResolvedOptions.of(options or Options())
