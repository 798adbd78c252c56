"""The cost of constrained decoding: tokens/s of the same batch free, free but one step per call
(the host round trip every grammar-constrained step needs), under a JSON schema, and under the
schema with grammar fast-forward (speculative decoding: the tokens the grammar forces, its fixed
keys, and text copied from earlier, verified several per forward pass); then the same requests
through the serving engine (continuous batching, as many slots as requests), free and under the
schema (these include prefill and the engine's text streaming).

    python benchmarks/structured.py                          # SmolLM2-135M demo, batches 1 and 8
    python benchmarks/structured.py --model /ckpt/codellama-7b --dtype bfloat16 --batches 1 8 32

The schema (an array of 100 records with a string, a bounded integer and an enum) cannot end within
`--new-tokens`, and stop tokens are suppressed in the free runs, so every row decodes exactly that
many tokens. "mask ms" is llguidance's time to compute one step's bitmask for the whole batch;
"accepted" is the share of drafted tokens kept with fast-forward.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import jax
import numpy as np

from codellama_jax import load, structured
from codellama_jax.demo_model import fetch_smollm2
from codellama_jax.engine import Engine
from codellama_jax.generation import output_grammar
from codellama_jax.sampling import SamplingParams
from codellama_jax.scheduler import Scheduler
from codellama_jax.speculative import Speculation

REPO = Path(__file__).resolve().parents[1]
RECORDS = {
    "type": "array", "minItems": 100, "maxItems": 100,
    "items": {"type": "object", "additionalProperties": False, "required": ["name", "score", "kind"],
              "properties": {"name": {"type": "string", "maxLength": 24},
                             "score": {"type": "integer", "minimum": 0, "maximum": 1000},
                             "kind": {"enum": ["function", "class", "module"]}}},
}  # fmt: skip
PROMPT = [{"role": "user", "content": "List the functions of Python's os module with a score and a kind, as JSON."}]


def decode_rate(model, batch_size: int, new_tokens: int, grammar, steps_per_call: int,
                speculation: Speculation | None = None) -> tuple[float, list[list[int]], Scheduler]:  # fmt: skip
    """Tokens/s of one batch through the library's scheduler (as generate() runs it, prefill
    included), text streamed after every call; each row's tokens; the scheduler."""
    suppress = {int(t): -100.0 for t in model.stop_token_ids} if grammar is None else None
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, logit_bias=suppress)
    ids = model.chat_template.encode(model.tokenizer, PROMPT)
    scheduler = Scheduler(model, max_batch=batch_size, max_len=len(ids) + new_tokens, steps_per_call=steps_per_call,
                          speculation=speculation)  # fmt: skip
    rows = [[] for _ in range(batch_size)]
    start = time.perf_counter()
    for r in range(batch_size):
        scheduler.add(scheduler.sequences(ids, params, lambda i, r=r: lambda chunk: rows[r].extend(chunk.token_ids), grammar))
    while scheduler.has_work():
        scheduler.step()
    seconds = time.perf_counter() - start
    assert sum(map(len, rows)) == batch_size * new_tokens, "a row stopped early"
    return batch_size * new_tokens / seconds, rows, scheduler


def mask_ms(model, rows: list[list[int]], grammar) -> float:
    """Mean time of one step's bitmask for the batch, replaying the tokens the batch generated."""
    constraints = [grammar.constraint() for _ in rows]
    times = []
    for j in range(min(map(len, rows))):
        start = time.perf_counter()
        structured.fill_bitmask(constraints, model.config.vocab_size)
        times.append(time.perf_counter() - start)
        for row, c in zip(rows, constraints):
            c.advance(row[j])
    return 1e3 * float(np.mean(times))


def engine_rate(engine: Engine, ids: list[int], requests: int, new_tokens: int, grammar) -> float:
    """Output tokens/s of `requests` concurrent requests through the engine."""
    suppress = {int(t): -100.0 for t in engine.model.stop_token_ids} if grammar is None else None
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, logit_bias=suppress)

    async def run() -> float:
        handles = [h for _ in range(requests) for h in engine.submit(ids, params, grammar)]
        start = time.perf_counter()
        counts = await asyncio.gather(*(_tokens(h) for h in handles))
        assert sum(counts) == requests * new_tokens, "a request stopped early"
        return sum(counts) / (time.perf_counter() - start)

    return asyncio.run(run())


async def _tokens(handle) -> int:
    return sum([len(chunk.token_ids) async for chunk in handle])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: the SmolLM2-135M demo GGUF)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    model = load(Path(args.model) if args.model else fetch_smollm2(REPO / ".cache" / "models"), dtype=args.dtype)
    grammar = output_grammar(model, {"type": "json_schema", "json_schema": {"name": "records", "schema": RECORDS}})
    print(f"device: {jax.devices()[0].device_kind}; {args.new_tokens} new tokens per row, greedy")
    ids = model.chat_template.encode(model.tokenizer, PROMPT)
    print(f"{'batch':>6}{'free tok/s':>12}{'1 step/call':>13}{'schema tok/s':>14}{'mask ms':>9}{'schema / free':>15}"
          f"{'fast-forward':>14}{'accepted':>10}{'ff / schema':>13}{'engine free':>13}{'engine schema':>15}"
          f"{'schema / free':>15}")  # fmt: skip
    for size in args.batches:
        n = args.new_tokens
        engine = Engine(model, max_batch=size, max_len=1024)
        engine.warm_up()  # as the server does before it serves
        engine.start()
        for _ in range(2):  # the first round compiles
            free, _, _ = decode_rate(model, size, n, None, n)
            stepped, _, _ = decode_rate(model, size, n, None, 1)
            constrained, rows, _ = decode_rate(model, size, n, grammar, 1)
            forwarded, ff_rows, scheduler = decode_rate(model, size, n, grammar, 1, Speculation(max_rows=size))
            served_free, served_schema = (engine_rate(engine, ids, size, n, g) for g in (None, grammar))
        engine.stop()
        assert ff_rows == rows, "fast-forward changed the output"
        stats = scheduler.stats()
        accepted = stats["speculative_accepted_tokens"] / max(stats["speculative_draft_tokens"], 1)
        print(f"{size:>6}{free:>12.1f}{stepped:>13.1f}{constrained:>14.1f}{mask_ms(model, rows, grammar):>9.2f}"
              f"{constrained / free:>14.2f}x{forwarded:>14.1f}{accepted:>10.0%}{forwarded / constrained:>12.2f}x"
              f"{served_free:>13.1f}{served_schema:>15.1f}{served_schema / served_free:>14.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
