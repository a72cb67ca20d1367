"""Where an engine step's wall time goes, by phase: the instrument of the host-cost benchmark.

The engine and the runner call `lap(phase)` as each phase ends; the default `NO_TIMER` does nothing,
so an engine that is not being measured pays one no-op call per phase. A `StepTimer` keeps one record
per step: seconds per phase, the step's wall time, and how many sequences and tokens it ran (so a
benchmark can keep only the pure decode steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplex.engine.scheduler import SchedulerOutput

PHASES = ("schedule", "inputs", "forward", "sample", "postprocess")
"""schedule: admitting loaded adapters' requests and `Scheduler.schedule`; inputs: the runner's step
inputs (host lists → tensors); forward: the model's forward and LM head (the tensor ops); sample:
sampling and per-row logit checks; postprocess: appending tokens, stop checks, detokenization, outputs."""


@dataclass
class StepRecord:
    phases: dict[str, float]
    """Seconds per phase (PHASES)."""
    wall: float
    """Seconds of the whole step, phases and everything between them."""
    num_seqs: int
    num_tokens: int

    @property
    def decode_only(self) -> bool:
        """Whether every sequence of the step computed a single token."""
        return self.num_tokens == self.num_seqs

    @property
    def host(self) -> float:
        """Seconds of the step outside the model's forward."""
        return self.wall - self.phases["forward"]


class NullTimer:
    """Measures nothing (the default)."""

    def start(self) -> None:
        pass

    def lap(self, phase: str) -> None:
        pass

    def stop(self, sched: SchedulerOutput) -> None:
        pass


@dataclass
class StepTimer(NullTimer):
    """Records every step's phases. `sync` (e.g. `torch.cuda.synchronize`) runs before the forward's lap
    ends, so that on a GPU the forward's time is the kernels' time and not only their launch."""

    sync: Callable[[], None] | None = None
    records: list[StepRecord] = field(default_factory=list)
    _phases: dict[str, float] = field(default_factory=dict)
    _start: float = 0.0
    _last: float = 0.0

    def start(self) -> None:
        self._phases = dict.fromkeys(PHASES, 0.0)
        self._start = self._last = perf_counter()

    def lap(self, phase: str) -> None:
        if phase == "forward" and self.sync is not None:
            self.sync()
        now = perf_counter()
        self._phases[phase] += now - self._last
        self._last = now

    def stop(self, sched: SchedulerOutput) -> None:
        wall = perf_counter() - self._start
        self.records.append(StepRecord(self._phases, wall, len(sched.chunks), sched.num_tokens))


NO_TIMER = NullTimer()
