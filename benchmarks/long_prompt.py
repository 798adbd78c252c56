"""A long prompt arriving while rows decode: how long the decoding rows wait between tokens
when it is prefilled in chunks between their decode calls (`--prefill-chunk`), against prefilled
whole, and whether its answer is the same.

    python benchmarks/long_prompt.py                           # SmolLM2-135M demo: 3,000 tokens, 8 rows
    python benchmarks/long_prompt.py --prompt-tokens 6000 --rows 16 --chunk 1024 --max-len 8192

Runs the scheduler in this process (no HTTP): `--rows` requests decode, then a prompt of
`--prompt-tokens` random token ids arrives. For each setting it prints the decoding rows'
largest and median gap between tokens while the long prompt is prefilled (until its first
token), and the long prompt's time to first token. Each setting runs twice and the second run
is reported (the first compiles).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from codellama_jax import load
from codellama_jax.demo_model import fetch_smollm2
from codellama_jax.sampling import SamplingParams
from codellama_jax.scheduler import Scheduler

REPO = Path(__file__).resolve().parents[1]


def scenario(model, rows: int, prompt: list[int], chunk: int, max_len: int, steps: int) -> tuple[list[float], float, list[int]]:
    """Gaps (s) between the decoding rows' deliveries while the long prompt prefills, its time to
    first token, and its greedy answer."""
    scheduler = Scheduler(model, max_batch=rows + 1, max_len=max_len, steps_per_call=steps, prefill_chunk=chunk,
                          prefix_caching=False)  # fmt: skip
    suppress = {int(t): -100.0 for t in model.stop_token_ids}  # every request runs to its length
    rng = np.random.default_rng(0)
    seen: list[list[float]] = [[] for _ in range(rows)]
    for r in range(rows):
        ids = rng.integers(3, model.config.vocab_size, 16).tolist()
        params = SamplingParams(temperature=0.7, seed=r, max_tokens=max_len - 16, logit_bias=suppress)
        scheduler.add(scheduler.sequences(ids, params, lambda _, r=r: lambda chunk: seen[r].append(time.perf_counter())))
    for _ in range(3):  # every row decoding
        scheduler.step()
    answer: list = []
    arrived = time.perf_counter()
    scheduler.add(scheduler.sequences(prompt, SamplingParams(temperature=0.0, max_tokens=8, logit_bias=suppress),
                                      lambda _: answer.append))  # fmt: skip
    while not answer:
        scheduler.step()
    first_token = time.perf_counter()
    while scheduler.rows[rows] is not None or scheduler.waiting:  # the long prompt's answer, to the end
        scheduler.step()
    ttft = first_token - arrived
    gaps = [b - a for times in seen for a, b in zip(times, times[1:]) if b > arrived and a < first_token]
    scheduler.fail_all(RuntimeError("benchmark over"))
    return gaps, ttft, [t for c in answer for t in c.token_ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: the SmolLM2-135M demo GGUF)")
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--rows", type=int, default=8, help="requests decoding when the long prompt arrives")
    parser.add_argument("--chunk", type=int, default=512, help="prefill tokens per step, chunked (default 512)")
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4, help="decode steps per call (the server's default 4)")
    parser.add_argument("--no-scan-layers", dest="scan_layers", action="store_false")
    args = parser.parse_args()
    if not 0 < args.prompt_tokens < args.max_len - 8:
        parser.error("--prompt-tokens must leave 8 tokens of --max-len for its answer")
    model = load(Path(args.model) if args.model else fetch_smollm2(REPO / ".cache" / "models"), scan_layers=args.scan_layers)
    prompt = np.random.default_rng(1).integers(3, model.config.vocab_size, args.prompt_tokens).tolist()
    print(f"device: {jax.devices()[0].device_kind}; a {args.prompt_tokens}-token prompt arrives while {args.rows} rows "
          f"decode ({args.steps} steps per call)")  # fmt: skip
    print(f"{'prefill':>22}{'largest gap s':>15}{'median gap s':>14}{'long TTFT s':>13}")
    answers = {}
    for name, chunk in ((f"in chunks of {args.chunk}", args.chunk), ("whole", args.max_len)):
        for _ in range(2):  # the first run compiles
            gaps, ttft, answers[name] = scenario(model, args.rows, prompt, chunk, args.max_len, args.steps)
        print(f"{name:>22}{max(gaps):>15.3f}{float(np.median(gaps)):>14.3f}{ttft:>13.3f}")
    print("the long prompt's answer is the same chunked and whole" if len(set(map(tuple, answers.values()))) == 1
          else f"ANSWERS DIFFER: {answers}")  # fmt: skip


if __name__ == "__main__":
    main()
