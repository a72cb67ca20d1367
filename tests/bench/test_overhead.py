"""The host-cost benchmark runs end to end on a small batch, and its step timer accounts for each step."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex import LLM, SamplingParams
from loraplex.bench import overhead
from loraplex.engine.step_timer import PHASES, StepTimer


def test_benchmark_prints_every_case_and_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    overhead.main(["--seqs", "6", "--steps", "3", "--adapters", "2", "--async-output", "off", "on",
                   "--async-scheduling", "off", "on"])
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if line.strip().startswith(("base", "lora"))]
    modes = ("off/off", "off/on", "on/off", "on/on")
    assert [" ".join(r[:2]) + " " + r[3] for r in rows] == [
        f"{case} {mode}" for case in ("base greedy", "lora greedy", "base sampled", "lora sampled") for mode in modes]
    for row in rows:
        wall, forward, host, *phases = map(float, row[4:])
        assert len(phases) == 4 and all(v >= 0 for v in phases)
        assert 0 < forward < wall and 0 < host < wall  # medians over steps, each of its own column
    assert [line.split(":")[0] for line in out[-4:]] == [
        f"host ms per decode step at 6 sequences (async output {o}, async scheduling {s})"
        for o in ("off", "on") for s in ("off", "on")]


def test_step_timer_records_phases_within_the_wall_time(base: Path) -> None:
    llm = LLM(str(base), num_blocks=64, block_size=4)
    timer = StepTimer()
    llm.engine.timer = timer
    llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=4, temperature=0))
    assert len(timer.records) >= 4
    for record in timer.records:
        assert set(record.phases) == set(PHASES)
        assert 0 < sum(record.phases.values()) <= record.wall
        assert record.host == pytest.approx(record.wall - record.phases["forward"])
    assert not timer.records[0].decode_only and timer.records[-1].decode_only
    assert timer.records[-1].num_seqs == 2
