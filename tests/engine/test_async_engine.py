import threading
from typing import Any

import pytest

from loraplex.engine.async_engine import AsyncEngine


class IdleEngine:
    """Stands in for an Engine with nothing to do: the loop only asks whether work is pending."""

    def __init__(self) -> None:
        self.built_on = threading.current_thread().name

    def has_unfinished(self) -> bool:
        return False


def test_a_factory_builds_the_engine_on_the_loop_thread() -> None:
    # The model's torch work must all run on one thread (loraplex.runtime): the one that steps it.
    async_engine = AsyncEngine(IdleEngine)  # type: ignore[arg-type]
    async_engine.start()
    try:
        engine: Any = async_engine.engine
        assert engine.built_on == "loraplex-engine"
        assert async_engine.alive
        async_engine.start()  # a second start is a no-op
        assert async_engine.engine is engine
    finally:
        async_engine.stop()


def test_a_failing_factory_fails_start_and_leaves_the_engine_dead() -> None:
    def broken() -> Any:
        raise ValueError("no such model: 'nowhere'")

    async_engine = AsyncEngine(broken)
    with pytest.raises(ValueError, match="no such model"):
        async_engine.start()
    assert not async_engine.alive
    assert isinstance(async_engine.dead, ValueError)
