"""Errors of checkpoint loading, shared by the loader and the format decoders it uses."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the tensor, field or file at fault."""
