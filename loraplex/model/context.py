"""The forward context: per-step batch metadata that layers read, so it never travels through forward signatures."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraplex.kv.block_pool import KVCache
from loraplex.model.attention import AttentionMetadata

if TYPE_CHECKING:
    from loraplex.lora.batch import LoRABatch


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    kv_cache: KVCache
    lora: LoRABatch | None = None


_current: ForwardContext | None = None


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    global _current
    previous, _current = _current, ctx
    try:
        yield
    finally:
        _current = previous


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("model forward called outside forward_context(); the runner sets it")
    return _current
