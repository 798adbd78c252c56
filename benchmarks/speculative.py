"""Prompt-lookup speculative decoding on a code edit: decode tokens/s with and without it, side
by side on the same model and prompt, greedy at batch 1, and the same for a prompt with nothing
to copy (free prose), where speculation should cost next to nothing.

    python benchmarks/speculative.py                                 # SmolLM2-135M demo model
    python benchmarks/speculative.py --num-tokens 4 8 --ngram-max 4 8
    python benchmarks/speculative.py --model /ckpt/codellama-7b --dtype bfloat16

The edit asks for a 60-line Python function back with type hints: most of the answer copies the
prompt. Decode tokens/s counts the tokens after the first over the time after the first
(prefill excluded), as generate() runs (16 decode steps per call without speculation); each
figure is the best of `--repeats` runs, and the texts must be identical.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from codellama_jax import load
from codellama_jax.demo_model import fetch_smollm2
from codellama_jax.generation import GENERATE_STEPS
from codellama_jax.sampling import SamplingParams
from codellama_jax.scheduler import Scheduler
from codellama_jax.speculative import Speculation

REPO = Path(__file__).resolve().parents[1]
FUNCTION = '''\
def summarize_orders(orders, customers, discount_rate, currency, min_total=0, include_refunds=False):
    """Group orders by customer and compute totals, averages and the largest order."""
    by_customer = {}
    refunds = []
    for order in orders:
        customer_id = order["customer_id"]
        if customer_id not in customers:
            continue
        amount = order["amount"]
        if order.get("refunded"):
            refunds.append(order)
            if not include_refunds:
                continue
            amount = -amount
        entry = by_customer.setdefault(customer_id, {"count": 0, "total": 0.0, "largest": None})
        entry["count"] += 1
        entry["total"] += amount
        if entry["largest"] is None or amount > entry["largest"]["amount"]:
            entry["largest"] = order
    report = []
    for customer_id, entry in by_customer.items():
        total = entry["total"] * (1 - discount_rate)
        if total < min_total:
            continue
        customer = customers[customer_id]
        average = total / entry["count"] if entry["count"] else 0.0
        report.append(
            {
                "customer": customer["name"],
                "email": customer.get("email", ""),
                "orders": entry["count"],
                "total": round(total, 2),
                "average": round(average, 2),
                "largest": entry["largest"]["id"] if entry["largest"] else None,
                "currency": currency,
            }
        )
    report.sort(key=lambda row: row["total"], reverse=True)
    totals = [row["total"] for row in report]
    grand_total = sum(totals)
    best = report[0]["customer"] if report else None
    worst = report[-1]["customer"] if report else None
    median = 0.0
    if totals:
        ordered = sorted(totals)
        middle = len(ordered) // 2
        if len(ordered) % 2:
            median = ordered[middle]
        else:
            median = (ordered[middle - 1] + ordered[middle]) / 2
    return {
        "rows": report,
        "grand_total": round(grand_total, 2),
        "median": round(median, 2),
        "best_customer": best,
        "worst_customer": worst,
        "refunds": len(refunds),
        "currency": currency,
    }
'''
EDIT = "Add type hints to every parameter and to the return value of this Python function. " \
    "Return the whole function and nothing else.\n\n"  # fmt: skip
WORKLOADS = {  # prompt, and tokens at most: the demo model's story starts repeating itself after ~250
    "edit": (EDIT + FUNCTION, 1024),
    "prose": ("Write a long story about a lighthouse keeper who finds a message in a bottle.", 200),
}


def run(model, prompt: list[int], new_tokens: int, spec: Speculation | None, batch: int) -> tuple[float, list[int], Scheduler]:
    """Decode tokens/s of `batch` greedy copies of one request, from the first token delivered
    to the last (the first token of each not counted); the first's tokens; the scheduler."""
    scheduler = Scheduler(model, max_batch=batch, max_len=len(prompt) + new_tokens, steps_per_call=GENERATE_STEPS,
                          speculation=spec)  # fmt: skip
    ids, times = [[] for _ in range(batch)], []

    def deliver(row: int, chunk) -> None:
        ids[row].extend(chunk.token_ids)
        times.append(time.perf_counter())

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    for row in range(batch):
        scheduler.add(scheduler.sequences(prompt, params, lambda i, row=row: lambda chunk: deliver(row, chunk)))
    while scheduler.has_work():
        scheduler.step()
    return (sum(map(len, ids)) - batch) / (times[-1] - times[0]), ids[0], scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint to run (default: the SmolLM2-135M demo GGUF)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--new-tokens", type=int, help="at most this many tokens per answer (default: the workload's)")
    parser.add_argument("--num-tokens", type=int, nargs="+", default=[Speculation.num_tokens], help="draft lengths to try")
    parser.add_argument("--ngram-min", type=int, default=Speculation.ngram_min)
    parser.add_argument("--ngram-max", type=int, nargs="+", default=[Speculation.ngram_max])
    parser.add_argument("--lines", type=int, help="edit only the function's first LINES lines (default: all 60)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help="copies of the request decoded at once")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = load(Path(args.model) if args.model else fetch_smollm2(REPO / ".cache" / "models"), dtype=args.dtype)
    print(f"{'workload':<9}{'batch':>6}{'draft':>6}{'ngram':>7}{'tokens':>8}{'decode tok/s':>14}{'without':>9}{'ratio':>7}"
          f"{'drafted':>9}{'accepted':>9}{'rate':>6}{'kept/draft':>11}  identical")  # fmt: skip
    for workload, batch in itertools.product(args.workloads, args.batches):
        text, new_tokens = WORKLOADS[workload]
        if workload == "edit" and args.lines:
            text = EDIT + "".join(FUNCTION.splitlines(keepends=True)[: args.lines])
        new_tokens = args.new_tokens or new_tokens
        prompt = model.chat_template.encode(model.tokenizer, [{"role": "user", "content": text}])
        run(model, prompt, new_tokens, None, batch)  # compiles
        base = max(run(model, prompt, new_tokens, None, batch)[0] for _ in range(args.repeats))
        _, want, _ = run(model, prompt, new_tokens, None, batch)
        for num_tokens, ngram_max in itertools.product(args.num_tokens, args.ngram_max):
            spec = Speculation(num_tokens, min(args.ngram_min, ngram_max), ngram_max, max_rows=batch)
            run(model, prompt, new_tokens, spec, batch)  # compiles
            runs = [run(model, prompt, new_tokens, spec, batch) for _ in range(args.repeats)]
            rate, ids, scheduler = max(runs, key=lambda r: r[0])
            stats = scheduler.stats()
            drafts, drafted, accepted = (stats[f"speculative_{k}"] for k in ("drafts", "draft_tokens", "accepted_tokens"))
            print(f"{workload:<9}{batch:>6}{num_tokens:>6}{ngram_max:>7}{len(ids):>8}{rate:>14.1f}{base:>9.1f}{rate / base:>6.2f}x"
                  f"{drafted:>9}{accepted:>9}{accepted / max(drafted, 1):>6.0%}"
                  f"{accepted / max(drafts, 1):>11.2f}  {ids == want}")  # fmt: skip


if __name__ == "__main__":
    main()
