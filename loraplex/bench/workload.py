"""The reference workload of shared/BENCHMARKS.md: 32 requests, ~16-token prompts, 64 greedy tokens each."""

from __future__ import annotations

import argparse

from loraplex.engine.request import SamplingParams

TOPICS = [
    "the history of the printing press", "how volcanoes form", "why the sky is blue", "the rules of chess",
    "how vaccines train the immune system", "the life cycle of a star", "how bread rises", "the water cycle",
    "how a bicycle stays upright", "the causes of ocean tides", "how computers store numbers",
    "the migration of monarch butterflies", "why leaves change colour in autumn", "how bees make honey",
    "the invention of the telephone", "how earthquakes are measured", "the structure of DNA",
    "how airplanes generate lift", "the origin of the Olympic games", "how coffee is roasted",
    "why cats purr", "how rainbows appear", "the building of the pyramids", "how solar panels work",
    "the basics of photosynthesis", "how glaciers move", "the discovery of penicillin",
    "how a compass finds north", "why onions make people cry", "how submarines dive",
    "the meaning of a leap year", "how noise-cancelling headphones work",
]


def reference_prompts(n: int = 32) -> list[str]:
    """~16-token prompts (SmolLM2 tokenizer), each different so no prefix is shared beyond a few tokens."""
    return [f"Write a short paragraph for a curious student about {TOPICS[i % len(TOPICS)]}:" for i in range(n)]


def reference_params(max_new_tokens: int = 64) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)


def add_workload_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags every benchmark of the reference workload takes, with its defaults."""
    ap.add_argument("--model", default="demo")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
