"""bench.lora runs end to end on the demo model (tiny workload: its numbers mean nothing) and prints the rows and
ratios of shared/BENCHMARKS.md's CPU table, with a second engine's `distinct` run when asked for another
`--lora-dtype`."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.bench import lora


def test_it_prints_every_row_and_ratio(demo_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lora.main(["--model", str(demo_model_path), "--requests", "4", "--new-tokens", "3", "--repeats", "1",
               "--adapters", "2", "--skip-hf", "--lora-dtype", "float32", "bfloat16"])
    out = capsys.readouterr().out
    for line in ("loraplex base only", "loraplex distinct ", "loraplex one adapter", "loraplex distinct, bfloat16",
                 "ratio distinct / base only", "ratio one adapter / base only", "ratio distinct, bfloat16 / base only"):
        assert line in out, line
    assert "hf+peft" not in out


def test_an_unknown_lora_dtype_is_refused() -> None:
    with pytest.raises(SystemExit) as refused:
        lora.main(["--lora-dtype", "int8"])
    assert refused.value.code == 2  # argparse's usage error, before any model loads
