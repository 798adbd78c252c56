"""Load against a running server: N concurrent streaming clients for M seconds each.

    make serve &                                   # or codellama-serve --model ...
    python benchmarks/serve.py --url http://127.0.0.1:8000 --clients 1 4 16 --seconds 30

Prints, per client count, requests/s, output tokens/s, time to first token p50/p99 and the
throughput relative to one client (what continuous batching buys).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
import openai

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain what a hash map is in two sentences.",
    "What is the capital of France?",
    "Write a haiku about compilers.",
    "List three sorting algorithms and their complexity.",
]


async def client_loop(client, model: str, deadline: float, max_tokens: int, seed: int, results: list) -> None:
    i = seed
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        first, tokens = None, 0
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens=max_tokens,
            temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        results.append((first if first is not None else time.perf_counter() - start, tokens))
        i += 1


async def run(url: str, api_key: str, model: str | None, clients: int, seconds: float, max_tokens: int) -> dict:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=600) as client:
        model = model or (await client.models.list()).data[0].id
        results: list = []
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, model, start + seconds, max_tokens, 1000 * c, results) for c in range(clients)))
        elapsed = time.perf_counter() - start
    ttft = np.array([r[0] for r in results])
    return {
        "clients": clients,
        "requests": len(results),
        "requests_s": len(results) / elapsed,
        "tokens_s": sum(r[1] for r in results) / elapsed,
        "ttft_p50": float(np.percentile(ttft, 50)),
        "ttft_p99": float(np.percentile(ttft, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="none", help="a key the server accepts, if it requires one")
    parser.add_argument("--model", help="served model name (default: the server's first model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    print(f"{'clients':>8}{'requests':>10}{'req/s':>8}{'out tok/s':>11}{'TTFT p50 s':>12}{'TTFT p99 s':>12}{'vs 1 client':>13}")
    base = None
    for clients in args.clients:
        r = asyncio.run(run(args.url, args.api_key, args.model, clients, args.seconds, args.max_tokens))
        base = base or (r["tokens_s"] if clients == 1 else None)
        ratio = f"{r['tokens_s'] / base:.2f}x" if base else "-"
        print(f"{clients:>8}{r['requests']:>10}{r['requests_s']:>8.2f}{r['tokens_s']:>11.1f}"
              f"{r['ttft_p50']:>12.3f}{r['ttft_p99']:>12.3f}{ratio:>13}")  # fmt: skip


if __name__ == "__main__":
    main()
