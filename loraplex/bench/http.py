"""HTTP throughput vs the offline engine, side by side in one run, on the reference workload.

    python -m loraplex.bench.http [--model demo] [--requests 32] [--new-tokens 64] [--repeats 3] [--stream]

Starts `loraplex serve` as a subprocess (as users run it), sends the workload as concurrent requests
over HTTP, and alternates with the same workload through the offline engine in this process. Prints
generated tokens per second for each (median of the repeats) and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

from loraplex.bench.workload import add_workload_arguments, reference_params, reference_prompts


def start_server(model: str, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.cli", "serve", "--model-id", model, "--port", str(port),
                             "--max-concurrent-requests", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become ready")


async def http_run(url: str, prompts: list[str], new_tokens: int, stream: bool) -> int:
    parameters = {"max_new_tokens": new_tokens, "ignore_eos_token": True, "details": True}
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(prompt: str) -> int:
            body = {"inputs": prompt, "parameters": parameters}
            if not stream:
                r = await client.post(url + "/generate", json=body)
                r.raise_for_status()
                return int(r.json()["details"]["generated_tokens"])
            tokens = 0
            async with client.stream("POST", url + "/generate_stream", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        tokens += "token" in json.loads(line[5:])
            return tokens

        counts = await asyncio.gather(*(one(p) for p in prompts))
    assert all(c == new_tokens for c in counts), counts
    return sum(counts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(ap)
    ap.add_argument("--stream", action="store_true", help="use /generate_stream (one SSE event per token)")
    args = ap.parse_args(argv)

    from loraplex import LLM
    from loraplex.paths import resolve_model

    model = str(resolve_model(args.model))
    prompts = reference_prompts(args.requests)
    params = reference_params(args.new_tokens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(model, port)
    url = f"http://127.0.0.1:{port}"
    try:
        llm = LLM(model, device="cpu")
        # Warm-up, both sides, on the whole workload: the first batch of its size allocates (KV blocks,
        # batch tensors, connections) on either side, and that is not the steady state being compared.
        llm.generate(prompts, reference_params(4))
        asyncio.run(http_run(url, prompts, 4, args.stream))
        rates: dict[str, list[float]] = {"offline": [], "http": []}
        for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both alike
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            rates["offline"].append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
            start = time.perf_counter()
            tokens = asyncio.run(http_run(url, prompts, args.new_tokens, args.stream))
            rates["http"].append(tokens / (time.perf_counter() - start))
    finally:
        server.terminate()
        server.wait(60)
    print(f"workload: {args.requests} concurrent requests, {args.new_tokens} new tokens each, greedy, ignore EOS; "
          f"model {model}; {'/generate_stream' if args.stream else '/generate'}")
    for name, values in rates.items():
        print(f"{name:8s} {statistics.median(values):8.1f} tokens/s   (runs: {', '.join(f'{r:.1f}' for r in values)})")
    ratio = statistics.median(rates["http"]) / statistics.median(rates["offline"])
    print(f"ratio http / offline: {ratio:.2f}x")


if __name__ == "__main__":
    main()
