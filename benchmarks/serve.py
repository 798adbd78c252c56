"""Load against a running server: N concurrent streaming clients for M seconds each.

    make serve &                                   # or codellama-serve --model ...
    python benchmarks/serve.py --url http://127.0.0.1:8000 --clients 1 4 16 --seconds 30
    python benchmarks/serve.py --clients 1 16 --against http://127.0.0.1:8080   # e.g. llama.cpp's llama-server
    python benchmarks/serve.py --clients 1 --library .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/serve.py --clients 1 --library MODEL --library-no-scan-layers   # a --no-scan-layers server
    python benchmarks/serve.py --workload chat --clients 4 --against http://127.0.0.1:8001   # a --no-prefix-caching server

Prints, per client count, requests/s, output tokens/s, time to first token p50/p99 and the
throughput relative to one client (what continuous batching buys). `--against` runs the same
workload on a second OpenAI endpoint and prints its row and our ratios to it; the servers take
turns, each workload's seconds split into `--rounds` runs (ours, the other; the other, ours;
...), so a shared machine speeding up or slowing down meanwhile weighs on both alike (each run
ends waiting for its last requests, counted in its time: more rounds, a little lower figures);
`--library` first runs the same prompts one after another through `generate()` in this process
(batch 1, same settings) and prints one client's tokens/s as a fraction of that.

`--workload chat` makes each client hold conversations of `--turns` turns that all begin with
the same system prompt of about 1,000 tokens, each turn's request carrying the whole history
(as a chat application sends it); it adds the time to first token of the later turns (p50) and,
for servers that report them on /metrics, the share of prompt tokens found in the prefix cache.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time

import httpx
import numpy as np
import openai

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain what a hash map is in two sentences.",
    "What is the capital of France?",
    "Write a haiku about compilers.",
    "List three sorting algorithms and their complexity.",
]
_RULES = [
    "Answer with working code first, then at most three sentences of explanation.",
    "Prefer the standard library; name any third-party package you use and why.",
    "Write type hints on every public function and keep functions short.",
    "Never invent an API: when unsure whether a function exists, say so.",
    "Point out a bug in the user's code before answering the question asked.",
    "Use descriptive names; avoid single letters except for loop indices.",
    "Show how to test the code with one small pytest example when it helps.",
    "Keep answers under forty lines unless the user asks for more.",
]


def system_prompt(rules: int) -> str:
    """The chat workload's shared system prompt: 48 rules are about 1,000 tokens for Llama-family
    tokenizers."""
    lines = (f"Rule {i + 1}: {_RULES[i % len(_RULES)]}" for i in range(rules))
    return "You are a careful senior software engineer who answers coding questions. House rules follow.\n" + "\n".join(lines)


async def client_loop(client, model: str, deadline: float, max_tokens: int, seed: int, chat: tuple[int, str] | None,
                      results: list) -> None:  # fmt: skip
    """Requests one after another until `deadline`; with `chat` (turns, system prompt),
    conversations of that many turns after the system prompt, each request carrying the history
    so far."""
    turns, system = chat or (0, "")
    i, history = seed, []
    while time.perf_counter() < deadline:
        turn = len(history) // 2
        question = {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}
        messages = [{"role": "system", "content": system}, *history, question] if turns else [question]
        start = time.perf_counter()
        first, tokens, text = None, 0, []
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens,
            temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first if first is not None else time.perf_counter() - start
                text.append(chunk.choices[0].delta.content)
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        results.append((first if first is not None else time.perf_counter() - start, tokens, turn))
        history = [*history, question, {"role": "assistant", "content": "".join(text)}] if turn + 1 < turns else []
        i += 1


def library_rate(path: str, seconds: float, max_tokens: int, scan_layers: bool = True) -> float:
    """Output tokens/s of the same requests through `generate()` at batch 1, one after another."""
    from codellama_jax import generate, load

    model = load(path, scan_layers=scan_layers)
    ask = lambda i: generate(model, [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]],  # noqa: E731
                             max_tokens=max_tokens, temperature=0.7, seed=i)[0].completion_tokens  # fmt: skip
    ask(0)  # compiles
    tokens, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += ask(i)
        i += 1
    return tokens / (time.perf_counter() - start)


def prefix_cache_tokens(url: str) -> tuple[float, float] | None:
    """Prompt tokens looked up in the server's prefix cache and found there, from its /metrics
    (None when it does not report them)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    found = [re.search(rf"^codellama_prefix_cache_{name}_tokens_total (\S+)$", text, re.M) for name in ("queried", "hit")]
    return None if None in found else (float(found[0].group(1)), float(found[1].group(1)))


async def run(url: str, api_key: str, model: str | None, clients: int, seconds: float, max_tokens: int,
              chat: tuple[int, str] | None = None) -> tuple[list, float]:  # fmt: skip
    """(time to first token, output tokens, turn) of each request `clients` clients completed,
    and the seconds they took."""
    # the SDK's default retries, as applications use it: some servers (llama-server) close idle
    # keep-alive connections, and a request sent on one is retried on a fresh connection
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, timeout=600) as client:
        model = model or (await client.models.list()).data[0].id
        results: list = []
        start = time.perf_counter()
        # seeds 1001 * c: each client samples its own answers, and starts at another question (of 5)
        await asyncio.gather(*(client_loop(client, model, start + seconds, max_tokens, 1001 * c, chat, results)
                               for c in range(clients)))  # fmt: skip
        return results, time.perf_counter() - start


def summary(runs: list[tuple[list, float]]) -> dict:
    """The figures of several runs of one workload on one server, pooled."""
    results, elapsed = [r for rs, _ in runs for r in rs], sum(seconds for _, seconds in runs)
    ttft = np.array([r[0] for r in results])
    later = [r[0] for r in results if r[2] > 0]
    return {
        "requests": len(results),
        "requests_s": len(results) / elapsed,
        "tokens_s": sum(r[1] for r in results) / elapsed,
        "ttft_p50": float(np.percentile(ttft, 50)),
        "ttft_p99": float(np.percentile(ttft, 99)),
        "later_p50": float(np.percentile(later, 50)) if later else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="none", help="a key the server accepts, if it requires one")
    parser.add_argument("--model", help="served model name (default: the server's first model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--workload", choices=["single", "chat"], default="single",
                        help="single: one-message requests; chat: conversations after a shared ~1,000-token system prompt")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation (--workload chat; default 4)")
    parser.add_argument("--system-rules", type=int, default=48,
                        help="rules in the chat workload's system prompt (default 48: ~1,000 tokens)")
    parser.add_argument("--against", metavar="URL", help="a second OpenAI endpoint to run the same workload on")
    parser.add_argument("--against-model", help="its model name (default: its first model)")
    parser.add_argument("--against-key", default="none", help="a key it accepts, if it requires one")
    parser.add_argument("--rounds", type=int, default=3,
                        help="split each workload's seconds into this many runs, taken in turns over the servers")
    parser.add_argument("--library", metavar="MODEL", help="also run the requests through generate() on this checkpoint")
    parser.add_argument("--library-no-scan-layers", dest="library_scan_layers", action="store_false",
                        help="load it with unrolled layers (as a server started with --no-scan-layers)")
    args = parser.parse_args()
    if args.rounds < 1 or args.turns < 1:
        parser.error("--rounds and --turns must be at least 1")
    turns = args.turns if args.workload == "chat" else 0
    chat = (turns, system_prompt(args.system_rules)) if turns else None
    reference = (library_rate(args.library, args.seconds, args.max_tokens, args.library_scan_layers)
                 if args.library else None)  # fmt: skip
    if reference:
        print(f"generate() at batch 1: {reference:.1f} tok/s")
    later = f"{'later p50 s':>13}" if turns else ""
    print(f"{'server':>8}{'clients':>8}{'requests':>10}{'req/s':>8}{'out tok/s':>11}{'TTFT p50 s':>12}{'TTFT p99 s':>12}"
          f"{later}{'vs 1 client':>13}{'vs other':>10}")  # fmt: skip
    targets = [("ours", args.url, args.api_key, args.model)]
    if args.against:
        targets.append(("other", args.against, args.against_key, args.against_model))
    runs: dict[tuple[str, int], list] = {}
    cache_before = {name: prefix_cache_tokens(url) for name, url, *_ in targets}
    for round_ in range(args.rounds):
        for clients in args.clients:
            for name, url, key, model in targets[:: 1 if round_ % 2 == 0 else -1]:  # who goes first alternates
                run_seconds = args.seconds / args.rounds
                runs.setdefault((name, clients), []).append(
                    asyncio.run(run(url, key, model, clients, run_seconds, args.max_tokens, chat)))
    results = {key: summary(value) for key, value in runs.items()}
    for name, *_ in targets:
        base = None
        for clients in args.clients:
            r = results[name, clients]
            base = base or (r["tokens_s"] if clients == 1 else None)
            ratio = f"{r['tokens_s'] / base:.2f}x" if base else "-"
            other = results.get(("ours", clients)) if name == "other" else None
            versus = f"{other['tokens_s'] / r['tokens_s']:.2f}x" if other else "-"
            later = f"{r['later_p50']:>13.3f}" if turns else ""
            print(f"{name:>8}{clients:>8}{r['requests']:>10}{r['requests_s']:>8.2f}{r['tokens_s']:>11.1f}"
                  f"{r['ttft_p50']:>12.3f}{r['ttft_p99']:>12.3f}{later}{ratio:>13}{versus:>10}")  # fmt: skip
    for name, url, *_ in targets:
        before, after = cache_before[name], prefix_cache_tokens(url)
        if before and after and after[0] > before[0]:
            print(f"{name}: prefix cache hit rate {(after[1] - before[1]) / (after[0] - before[0]):.0%} of prompt tokens")
    if reference and ("ours", 1) in results:
        print(f"one client: {results['ours', 1]['tokens_s'] / reference:.2f}x generate() at batch 1")
    if args.against:
        for clients in args.clients:
            ours, other = results["ours", clients], results["other", clients]
            later = f", later turns' {ours['later_p50'] / other['later_p50']:.0%} of the other's" if turns else ""
            print(f"{clients} client(s): {ours['tokens_s'] / other['tokens_s']:.2f}x the other's tokens/s, "
                  f"time to first token (p50) {ours['ttft_p50'] / other['ttft_p50']:.0%} of the other's{later}")  # fmt: skip


if __name__ == "__main__":
    main()
