"""Data: pretraining token streams, supervised fine-tuning sets, and synthetic task generators."""

from __future__ import annotations


class DataError(ValueError):
    """Bad training data; the message names the file, the line and what was expected."""
