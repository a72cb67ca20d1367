"""bench.gpu: without CUDA it says so and exits 0; `--device cpu --tiny` runs every part of the script."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.bench import gpu


def test_without_cuda_it_says_so_and_exits_0(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_every_part_runs_on_a_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    assert gpu.main(["--device", "cpu", "--tiny", "--requests", "6", "--prompt-tokens", "12", "--new-tokens", "6",
                     "--adapters", "3", "--peft-requests", "3", "--peft-new-tokens", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("loraplex base", "loraplex one adapter", "loraplex distinct", "hf generate base", "hf+peft distinct",
                "ratio distinct / base", "ratio distinct / hf+peft", "batch-1 ms per token, adapter",
                "loraplex base, eager", "ratio base: graphs / eager", "batch-1 ms per token, base, eager",
                "loraplex base, int4", "ratio base: int4 / bf16", "loraplex base, sync sched",
                "ratio base: async / sync sched",
                "CUDA graphs: off (decode runs eager on cpu", "adapter load, rank 16 on all projections"):
        assert row in out, row
    # The adapters change the model, and loraplex's mixed batch equals PEFT's request by request.
    assert "fp32 mixed-batch parity with PEFT: 8/8 requests token for token" in out
    changed = int(out.split("changed the tokens of ")[1].split()[0])
    assert changed >= 3, out
