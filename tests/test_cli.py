"""The README's first command, run as a user would: `loraplex generate` on the demo model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _loraplex(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loraplex.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_chat_on_demo(demo_model_path):
    done = _loraplex("generate", "--chat", "What is the capital of France?", "--max-new-tokens", "20", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "Paris" in out["text"] and out["finish_reason"] == "eos_token"
    assert "tokens/s" in done.stderr


def test_generate_reports_bad_input_clearly(tmp_path):
    done = _loraplex("generate", "--model", str(tmp_path), "hi")
    assert done.returncode == 2
    assert "no config.json" in done.stderr and "Traceback" not in done.stderr
    done = _loraplex("generate", "--temperature", "-1", "hi")
    assert done.returncode == 2 and "temperature must be >= 0" in done.stderr


def test_a_boolean_flag_alone_means_true_and_takes_a_value(monkeypatch) -> None:
    from loraplex.cli import build_parser, engine_options

    monkeypatch.delenv("LORAPLEX_ENFORCE_EAGER", raising=False)
    parse = build_parser().parse_args
    assert engine_options(parse(["serve"]))["enforce_eager"] is False
    assert engine_options(parse(["serve", "--enforce-eager"]))["enforce_eager"] is True
    assert engine_options(parse(["serve", "--enforce-eager", "false", "--model", "demo"]))["enforce_eager"] is False
    options = engine_options(parse(["serve", "--enable-prefix-caching", "--cuda-graph-max-batch", "64"]))
    assert options["enable_prefix_caching"] is True and options["cuda_graph_max_batch"] == 64


def test_every_command_prints_its_help(capsys) -> None:
    # Each flag's help is its config field's docstring, which may hold "%" (argparse formats help with %).
    from loraplex.cli import build_parser

    parser = build_parser()
    for command in ("serve", "generate", "ray-serve", "download"):
        with pytest.raises(SystemExit) as done:
            parser.parse_args([command, "--help"])
        assert done.value.code == 0
        assert "usage:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--lora-dtype" in shown and "its share of the step fell by 15-30 %," in shown
