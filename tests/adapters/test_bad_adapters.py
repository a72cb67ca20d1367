"""Broken adapters fail their load with an AdapterError subclass whose message names the adapter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from loraplex.adapters.loader import AdapterLoader
from loraplex.adapters.local_source import LocalSource
from loraplex.adapters.ref import AdapterRef
from loraplex.lora.adapter import CONFIG_FILE, SAFETENSORS_FILE, AdapterError, AdapterInvalid, AdapterNotFound
from tests.adapters.adapter_files import parse, write_adapter


def _truncate(folder: Path) -> None:
    data = (folder / SAFETENSORS_FILE).read_bytes()
    (folder / SAFETENSORS_FILE).write_bytes(data[: len(data) // 2])


BREAKAGES: dict[str, tuple[Callable[[Path], object] | None, type[AdapterError], str]] = {
    "missing-folder": (None, AdapterNotFound, "not a folder"),
    "empty-folder": (lambda f: [p.unlink() for p in f.iterdir()], AdapterInvalid, "no adapter_config.json"),
    "corrupt-safetensors": (lambda f: (f / SAFETENSORS_FILE).write_bytes(b"\x07" * 300), AdapterInvalid,
                            "not a readable safetensors file"),
    "truncated-safetensors": (_truncate, AdapterInvalid, "not a readable safetensors file"),
    "missing-config": (lambda f: (f / CONFIG_FILE).unlink(), AdapterInvalid, "no adapter_config.json"),
    "invalid-config": (lambda f: (f / CONFIG_FILE).write_text('{"peft_type": "LORA", "r": '), AdapterInvalid,
                       "not valid JSON"),
    "wrong-peft-type": (lambda f: (f / CONFIG_FILE).write_text('{"peft_type": "IA3", "r": 4}'), AdapterInvalid,
                        "peft_type"),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_a_broken_adapter_fails_with_a_named_error(tmp_path: Path, name: str) -> None:
    breakage, error, message = BREAKAGES[name]
    if breakage is not None:
        breakage(write_adapter(tmp_path / name))
    with (AdapterLoader({"local": LocalSource((str(tmp_path),))}, parse) as loader,
          pytest.raises(error, match=message) as info):
        loader.request(AdapterRef("local", name)).result(timeout=30)
    assert name in str(info.value)
