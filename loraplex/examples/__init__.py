"""LoRA adapters for the demo model, bundled so that `loraplex serve` shows per-adapter behaviour out of the box.

Each folder under `adapters/` is a PEFT adapter (`adapter_config.json`, float16
`adapter_model.safetensors`) with a README saying what it does and how it was trained;
`scripts/train_example_adapters.py` retrains them all.
"""

from __future__ import annotations

from pathlib import Path

ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"


def example_adapters() -> dict[str, Path]:
    """The bundled adapters by name (the folder name, e.g. "upper"), sorted, each an absolute folder path
    usable as an `adapter_id`."""
    if not ADAPTERS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(ADAPTERS_DIR.iterdir()) if (p / "adapter_config.json").is_file()}
