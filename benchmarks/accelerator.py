"""The first thing to run on an accelerator: one GPU, or one TPU host (its first chip).

    pip install -e '.[cuda12]'                           # or '.[tpu]': JAX's accelerator wheels first
    JAX_PLATFORMS=cuda timeout 540 python benchmarks/accelerator.py   # (or tpu) writes benchmarks/RESULTS.md
    python benchmarks/accelerator.py --budget-seconds 300 --output /tmp/RESULTS.md
    python benchmarks/accelerator.py --shapes tiny       # the smoke run (the default on CPU)

`JAX_PLATFORMS=cuda` (or `tpu`) makes JAX fail when it finds no such device, instead of quietly
running everything on the CPU.

In under 8 minutes, on random models made on the device (CodeLlama-7B's shape, and CodeLlama-70B's
width, heads and grouped-query attention with as many of its 80 layers as fit comfortably, at most
10): memory bandwidth (measured, and the datasheet's figure when the device kind is known); the
decode attention kernel `codellama_jax.attention` picks on this backend against the pure-JAX
reference (error and speed of one decode-shaped call); decode and prefill tokens/s through the
library's own scheduler and runner (generate.py's `ours()`, as `generate()` runs them), decode as
a share of the bandwidth bound (weights and KV cache reads); XLA's working memory while decoding
int8 weights (does it keep a dequantized copy?); and the compile time of every prefill and decode
program those runs needed. Decode runs at every batch in the compute dtype, int8 at the smallest
and largest batch only; when decode through the Pallas kernel fails, it is noted and decode is
measured again through the reference attention (labelled so).

The budget (`--budget-seconds`) is checked before each item, against what the last item of its
kind took for the same model (else for any model, else a first guess): an item that would not fit
is skipped, saying so, but a started item runs to its end, so the last one can overrun the budget:
wrap the run in `timeout 540`. A failing item (a kernel that does not compile) is noted and the
rest runs; the script then exits with status 1, its last line saying how many items failed and
where (skips, for the budget or for memory, are not failures). A model the memory planner says
does not fit the device comfortably is skipped (on a 16 GiB chip: 7B, and 70B width with fewer
layers); `--device-memory` stands in for a backend that reports no memory (CPU), so that the
smoke run goes through that planning too.

RESULTS.md gets one `## <device kind>, <date>` section per run, newest first, replacing an older
one of the same device kind (tiny runs are kept apart from full ones), rewritten after every item
so that a run cut short keeps what it measured; stdout gets the same section at the end. Commit
RESULTS.md (the section names the commit it measured), and quote its figures in README's
Benchmarks and "Not finished yet" (the Pallas kernels, int8 decode memory, accelerator figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import re
import subprocess
import sys
import time
import timeit
import traceback
from pathlib import Path
from typing import Callable, TypeVar

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx

from codellama_jax import buckets, sharding
from codellama_jax.attention import decode_attention, decode_kernel
from codellama_jax.config import PRESETS, LlamaConfig
from codellama_jax.generation import GENERATE_STEPS
from codellama_jax.kv_cache import KVCache, blocks_for
from codellama_jax.loader import Model, default_dtype
from codellama_jax.model import Llama, Proj, abstract_model
from codellama_jax.plan import parse_bytes, plan
from codellama_jax.quantize import quantize_int8
from codellama_jax.sampling import SamplingParams
from codellama_jax.scheduler import Scheduler
from generate import memory_bandwidth, ours

START = time.monotonic()
REPO = Path(__file__).resolve().parents[1]
BLOCK_SIZE = 16  # the scheduler's default KV cache block
USABLE = 0.75  # share of device memory a model's plan may take ("comfortably"); the rest is XLA's
MAX_WIDE_LAYERS = 10
T = TypeVar("T")

# Datasheet memory bandwidth in GB/s by device kind (first match): a second bound beside the measured one.
NOMINAL_GBPS = (("H200", 4800), ("H100 PCIe", 2000), ("H100 NVL", 3900), ("H100", 3350),
                ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L4", 300),
                ("TPU v6 lite", 1640), ("TPU v5 lite", 819), ("TPU v5p", 2765), ("TPU v5", 2765), ("TPU v4", 1228))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes of one run: `full` on an accelerator, `tiny` for a smoke run on CPU."""

    small: tuple[str, LlamaConfig]  # CodeLlama-7B's shape
    wide: tuple[str, LlamaConfig]  # CodeLlama-70B's width; its layers are cut to what fits
    batches: tuple[int, ...]  # decode rows
    prompt_len: int  # decode runs: prompt tokens per row, then new tokens
    new_tokens: int
    long_prompt: int  # prefill: one prompt of this many tokens, and as many tokens in `short_prompts` prompts
    short_prompts: int
    kernel_rows: int  # the attention check: rows of one decode call, each reading up to `kernel_positions`
    kernel_positions: int
    first_guess_s: float  # what an item is assumed to take until one of its kind has run


_TINY = dict(vocab_size=512, max_seq_len=512)
SHAPES = {
    "full": Shapes(("CodeLlama-7B shape", PRESETS["codellama-7b-instruct"]),
                   ("CodeLlama-70B width", PRESETS["codellama-70b-instruct"]),
                   (1, 8, 64), 128, 128, 2048, 8, 32, 2048, 30.0),
    "tiny": Shapes(("tiny 7B-like", LlamaConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, **_TINY)),
                   ("tiny 70B-like", LlamaConfig(dim=128, ffn_dim=256, num_layers=2, num_heads=8, num_kv_heads=1, head_dim=16, **_TINY)),
                   (2,), 16, 8, 128, 4, 4, 64, 2.0),
}  # fmt: skip

ATTENTION = "Decode attention: kernel against reference"
SECTIONS = {  # title: (what it shows, columns)
    "Memory bandwidth": (
        "A float32 matrix-vector product over 2 GiB (generate.py's `memory_bandwidth`), best of 5.",
        ("measured GB/s", "nominal GB/s", "measured / nominal"),
    ),
    "Models": (
        "Random weights made on the device by jitted calls (int8: one weight per call), never on the host.",
        ("model", "dim / ffn / layers / heads / kv heads / head dim", "weights", "MiB", "made in s"),
    ),
    ATTENTION: (
        f"One decode call (blocks of {BLOCK_SIZE}, lengths from half to all the positions, layer 1 of a two-layer "
        "pool) through the Pallas kernel `decode_kernel` picks here and through the reference (gather, then dense "
        "attention); ms per call over back-to-back calls, best of 3; GB/s: the keys and values the rows read.",
        ("kernel", "mode", "rows x positions", "heads / kv heads / head dim", "max abs error", "kernel ms",
         "reference ms", "reference / kernel", "kernel GB/s"),
    ),  # fmt: skip
    "Decode": (
        f"generate.py's `ours()`: the scheduler as `generate()` runs it, greedy, stop tokens suppressed, "
        f"{GENERATE_STEPS} steps per call; prefill from runs of one new token, decode from a full run minus that. "
        "attention: the decode attention it ran (reference after a failed kernel: the kernel's failure is noted). "
        "% of bound: decode against bandwidth / bytes read per step, a step reading every weight and each row's "
        "keys and values up to its mean position (prompt + half the new tokens; the reference reads its whole "
        "window bucket, the kernels only the row's positions). temp MiB: XLA's working memory of the compiled "
        "decode call.",
        ("model", "weights", "batch", "attention", "prefill tok/s", "decode tok/s", "KV MiB read per step",
         "% of bound (measured)", "% of bound (nominal)", "temp MiB"),
    ),  # fmt: skip
    "int8 decode memory": (
        "XLA's temp bytes of the compiled int8 decode call against the weights dequantized: near all of them means "
        "XLA keeps a dequantized copy (as XLA:CPU does), defeating int8; the memory planner assumes no copy.",
        ("model", "batch", "weights MiB", "dequantized MiB", "one layer dequantized MiB", "temp MiB", "verdict"),
    ),
    "Prefill": (
        "Prompts through the scheduler, prefilled together in one call, each first token sampled; best of 2 after "
        "a compiling run.",
        ("model", "prompts x tokens", "seconds", "tok/s"),
    ),
    "Compile times": (
        "Seconds JAX spent tracing, lowering and compiling the runner's programs when a run first met its shapes "
        "(how many programs in parentheses); other: the rest compiled meanwhile.",
        ("model", "run", "prefill", "first token", "decode", "other"),
    ),
}
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")  # fmt: skip
_PROGRAMS = ("_prefill", "_first", "_decode")  # the runner's jitted functions, as JAX names them


class Bench:
    """The run's report and clock: tables filled as items finish, notes for what was skipped or
    failed, this run's section rewritten into the results file after every item."""

    def __init__(self, shapes_name: str, dtype: str, budget_s: float, output: Path, device_memory: int | None = None):
        self.shapes, self.dtype, self.output = SHAPES[shapes_name], dtype, output
        self.budget_s = budget_s
        device = jax.devices()[0]
        self.device_kind = device.device_kind
        reported = (device.memory_stats() or {}).get("bytes_limit")
        self.memory = reported or device_memory  # what the memory planner plans for
        self.key = self.device_kind + (", tiny shapes" if shapes_name == "tiny" else "")  # the section it replaces
        self.date = datetime.datetime.now(datetime.timezone.utc)
        self.environment = [
            f"date: {self.date:%Y-%m-%d %H:%M} UTC; commit {_commit()}",
            f"jax {jax.__version__}, jaxlib {jaxlib.__version__}; backend {jax.default_backend()}",
            f"devices: {jax.device_count()} x {self.device_kind} (the first one measured); memory per device: "
            + (_size(reported) if reported else "not reported")
            + (f" (--device-memory {_size(device_memory)} planned for)" if device_memory and not reported else ""),
            f"shapes: {shapes_name}; dtype {dtype}"
            + (" (bfloat16 matmuls are slow in XLA:CPU)" if jax.default_backend() == "cpu" else ""),
        ]
        self.rows: dict[str, list[tuple]] = {title: [] for title in SECTIONS}
        self.notes: dict[str, list[str]] = {title: [] for title in SECTIONS}
        self.took: dict[str | tuple[str, str], float] = {}  # seconds the last item of each kind (and model) took
        self.failed: list[str] = []  # "section: item" of every item that failed
        self.compiles: list[tuple[str, str, float]] = []  # (event, function, seconds) of every compile so far
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, seconds: float, **kwargs) -> None:
        if event in _COMPILE_EVENTS:
            self.compiles.append((event, kwargs.get("fun_name", "?").removeprefix("jit(").removesuffix(")"), seconds))

    def attempt(self, section: str, what: str, kind: str, fn: Callable[[], T], model: str = "") -> T | None:
        """`fn()`; None, with a note, when the budget left is shorter than the last item of this
        `kind` took for this `model` (else for any model, else a first guess), or when it fails:
        one kernel that does not compile must not cost the rest of the run (failures are counted)."""
        need = self.took.get((kind, model), self.took.get(kind, self.shapes.first_guess_s))
        left = START + self.budget_s - time.monotonic()
        if left < need:
            return self.note(section, f"{what}: skipped, {left:.0f} s of the budget left and about {need:.0f} s needed")
        start = time.monotonic()
        try:
            result = fn()
            print(f"[{time.monotonic() - START:4.0f} s] {section}: {what}", file=sys.stderr, flush=True)
            return result
        except Exception as e:
            traceback.print_exc()
            first = str(e).strip().splitlines()[:1]
            self.failed.append(f"{section}: {what}")
            return self.note(section, f"{what}: failed: {type(e).__name__}: {first[0][:300] if first else ''}")
        finally:
            self.took[kind] = self.took[kind, model] = time.monotonic() - start
            self.write()

    def note(self, section: str, note: str) -> None:
        """A line under a section's table (what was skipped, what failed, and why), printed too."""
        print(f"[{time.monotonic() - START:4.0f} s] {section}: {note}", file=sys.stderr, flush=True)
        self.notes[section].append(note)

    def add_compiles(self, model: str, run: str, since: int) -> None:
        """A row of compile times: what was compiled since the `since`-th compile event."""
        seconds, programs = dict.fromkeys((*_PROGRAMS, "other"), 0.0), dict.fromkeys((*_PROGRAMS, "other"), 0)
        for event, name, s in self.compiles[since:]:
            name = name if name in _PROGRAMS else "other"
            seconds[name] += s
            programs[name] += event == _COMPILE_EVENTS[-1]
        cells = (f"{seconds[n]:.1f} ({programs[n]})" if programs[n] else "-" for n in seconds)
        self.rows["Compile times"].append((model, run, *cells))

    def misfit(self, config: LlamaConfig, weights: str, prefill: bool = True) -> str | None:
        """Why the memory planner says a model's decode (and `prefill`) runs do not fit the device
        comfortably; None when they do, or when the backend does not report its memory."""
        if not self.memory:
            return None
        s = self.shapes
        runs = [(max(s.batches), s.prompt_len + s.new_tokens)] + [(s.short_prompts, prefill_len(s))] * prefill
        for rows, max_len in runs:
            p = plan(config, devices=1, device_memory=self.memory, dtype=weights, compute_dtype=self.dtype,
                     max_batch=rows, max_len=max_len, usable=USABLE)  # fmt: skip
            if not p.fits:
                return (f"the planner counts {_size(p.total_bytes)} for {rows} rows of {max_len} tokens, "
                        f"over {USABLE:.0%} of {_size(self.memory)}")  # fmt: skip
        return None

    def markdown(self) -> str:
        lines = [f"## {self.key}, {self.date:%Y-%m-%d}", ""]
        lines += [f"- {line}" for line in self.environment]
        lines += [f"- run: {time.monotonic() - START:.0f} s of a {self.budget_s:.0f} s budget; "
                  f"{len(self.failed)} item(s) failed", ""]
        for title, (caption, columns) in SECTIONS.items():
            lines += [f"### {title}", "", caption, ""]
            if self.rows[title]:
                lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                lines += ["| " + " | ".join(map(str, row)) + " |" for row in self.rows[title]] + [""]
            notes = self.notes[title] or ([] if self.rows[title] else ["nothing measured"])
            lines += [f"- {note}" for note in notes] + ([""] if notes else [])
        return "\n".join(lines)

    def write(self) -> None:
        """This run's section first, then the file's sections of other device kinds."""
        old = self.output.read_text() if self.output.exists() else (
            "# Accelerator results\n\nWritten by `python benchmarks/accelerator.py`: one section per device kind, "
            "newest first.\n\n"
        )  # fmt: skip
        preamble, *sections = re.split(r"(?m)^(?=## )", old)
        kept = [s for s in sections if s.splitlines()[0][3:].rsplit(", ", 1)[0] != self.key]
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_text(preamble + self.markdown() + "\n" + "".join(kept))


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = " with uncommitted changes" if git("status", "--porcelain", "-uno") else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + dirty


def prefill_len(shapes: Shapes) -> int:
    """The prefill runs' max_len: the long prompt and its first token, and the short prompts'
    tokens in one call (a prefill call takes up to max_len tokens)."""
    return shapes.long_prompt + BLOCK_SIZE


def nominal_bandwidth(device_kind: str) -> float | None:
    """Bytes/s of the device's datasheet, when its kind is in NOMINAL_GBPS."""
    return next((gbps * 1e9 for name, gbps in NOMINAL_GBPS if name.lower() in device_kind.lower()), None)


def random_model(config: LlamaConfig, dtype: str, quant: str | None = None) -> Model:
    """A model of random weights (normal, std 0.02) made by jitted calls whose outputs stay on
    the first device: nothing is built on the host and copied (7B in bfloat16 is 13.5 GB). int8
    weights are such weights quantized as `load()` quantizes them, one weight per call: in one
    call XLA would hold every full-precision weight at once (43 GiB for 70B's width at 10 layers).
    The "rbg" generator is XLA's own: threefry's programs compile seconds slower."""
    mesh = sharding.single_device_mesh()
    param_dtype = jnp.dtype(dtype)
    graphdef, _ = nnx.split(abstract_model(config, param_dtype=param_dtype, dtype=param_dtype, quant=quant))

    def make() -> nnx.State:  # int8 weights: zeros with unit scales
        rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
        return nnx.state(Llama(config, param_dtype=param_dtype, dtype=param_dtype, quant=quant, rngs=rngs))

    module = nnx.merge(graphdef, jax.jit(make, out_shardings=sharding.replicated(mesh))())
    if quant:
        int8 = [(p.kernel, p.scale) for _, p in nnx.iter_graph(module) if isinstance(p, Proj)]
        for i, (kernel, scale) in enumerate(int8 + [(module.embed, module.embed_scale)]):
            key = jax.random.key(i, impl="rbg")  # on the first device: so are the call's outputs
            kernel.value, scale.value = _random_int8(key, kernel.shape, kernel.quant_axes)
    return Model(config, module, None, None, mesh)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_int8(key: jax.Array, shape: tuple[int, ...], in_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """One random weight quantized; XLA holds it in float32 meanwhile (8.8 GiB for 70B's MLP at 10 layers)."""
    return quantize_int8(0.02 * jax.random.normal(key, shape, jnp.float32), in_axes)


def _bytes(model: Model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(model.params))


def step_kv_bytes(config: LlamaConfig, dtype) -> int:
    """Bytes of one cached position's keys and values, every layer: what a decode step reads per
    position a row attends to."""
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize


def attention_check(config: LlamaConfig, rows: int, positions: int, dtype: str, kernel: str, interpret: bool) -> dict:
    """Max abs error and seconds per call of one decode attention call through `kernel` and
    through the reference, on random queries and a random pool holding `rows` rows' blocks."""
    K, N, H = config.num_kv_heads, config.num_heads, config.head_dim
    J = blocks_for(positions, BLOCK_SIZE)
    M = rows * J
    kq, kk, kv, kt, kl = jax.random.split(jax.random.key(0, impl="rbg"), 5)

    def normal(k, shape):  # values bfloat16 holds, as TPU's interpreter multiplies; op by op, as jit may skip rounding
        return jax.random.normal(k, shape, jnp.bfloat16).astype(dtype)

    cache = KVCache(normal(kk, (K, 2, M, BLOCK_SIZE, H)), normal(kv, (K, 2, M, BLOCK_SIZE, H)))
    table_BJ = jax.random.permutation(kt, M).reshape(rows, J).astype(jnp.int32)
    lengths_B = jax.random.randint(kl, (rows,), positions // 2, positions + 1, jnp.int32)
    args = (normal(kq, (rows, N, H)), cache, table_BJ, lengths_B)

    def run(which: str) -> tuple[np.ndarray, float]:
        call = jax.jit(lambda q, cache, table, lengths: decode_attention(q, cache, 1, table, lengths, which, interpret))
        out_BNH = call(*args).block_until_ready()
        calls = 2 if interpret else 20

        def back_to_back():  # the device runs them one after another, the host's dispatch hidden
            for _ in range(calls):
                out = call(*args)
            out.block_until_ready()

        return np.asarray(out_BNH, np.float32), min(timeit.repeat(back_to_back, number=1, repeat=3)) / calls

    (got, kernel_s), (want, reference_s) = run(kernel), run("reference")
    read = int(lengths_B.sum()) * K * H * 2 * jnp.dtype(dtype).itemsize
    return {"error": float(np.max(np.abs(got - want))), "kernel_s": kernel_s, "reference_s": reference_s,
            "gbps": read / kernel_s / 1e9}  # fmt: skip


def check_kernels(bench: Bench, config: LlamaConfig) -> None:
    """The kernel `decode_kernel` picks for one device of this backend against the reference; on
    CPU, where it picks the reference, both Pallas kernels in interpret mode, as the tests run them."""
    s = bench.shapes
    chosen = decode_kernel(sharding.single_device_mesh(), BLOCK_SIZE, config.head_dim)
    backend = jax.default_backend()
    runs = [(chosen, False)] if chosen != "reference" else [("gpu", True), ("tpu", True)] if backend == "cpu" else []
    if chosen == "reference":
        bench.note(
            ATTENTION,
            f"decode_kernel picks the reference on {backend} for blocks of {BLOCK_SIZE} and head dim {config.head_dim}"
            + (": the Pallas kernels ran in interpret mode, their times say nothing of a device" if runs else "")
        )
    for kernel, interpret in runs:

        def check(kernel=kernel, interpret=interpret):
            r = attention_check(config, s.kernel_rows, s.kernel_positions, bench.dtype, kernel, interpret)
            bench.rows[ATTENTION].append((kernel, "interpret" if interpret else "compiled", f"{s.kernel_rows} x {s.kernel_positions}",
                                          f"{config.num_heads} / {config.num_kv_heads} / {config.head_dim}", f"{r['error']:.2e}",
                                          f"{1e3 * r['kernel_s']:.3f}", f"{1e3 * r['reference_s']:.3f}",
                                          f"{r['reference_s'] / r['kernel_s']:.2f}x", f"{r['gbps']:.3g}"))  # fmt: skip

        bench.attempt(ATTENTION, f"{kernel} kernel", "kernel", check)


def prefill_seconds(model: Model, prompts_PT: np.ndarray, max_len: int) -> float:
    """Seconds to prefill the prompts and sample each one's first token, through a fresh
    scheduler that admits them all at once (prefill chunks of max_len, no prefix cache)."""
    scheduler = Scheduler(model, max_batch=len(prompts_PT), max_len=max_len, prefill_chunk=max_len,
                          prefix_caching=False)  # fmt: skip
    done = []
    params = SamplingParams(temperature=0.0, max_tokens=1)
    for row in prompts_PT:
        scheduler.add(scheduler.sequences(list(map(int, row)), params, lambda i: done.append))
    start = time.perf_counter()
    while scheduler.has_work():
        scheduler.step()
    seconds = time.perf_counter() - start
    for chunk in done:
        if isinstance(chunk, BaseException):
            raise chunk
    return seconds


def int8_temp_bytes(model: Model, batch: int, shapes: Shapes) -> int:
    """XLA's temp bytes of the decode call `ours()` runs at this batch, compiled without running
    it (the run then reuses the program)."""
    max_len = shapes.prompt_len + shapes.new_tokens
    runner = Scheduler(model, max_batch=batch, max_len=max_len, steps_per_call=GENERATE_STEPS).runner
    compiled = runner.compile_decode(batch, buckets.window_bucket(max_len, max_len), GENERATE_STEPS)
    return compiled.memory_analysis().temp_size_in_bytes


def verdict(temp: float, dequantized: float, layers: int) -> str:
    """What XLA's temp bytes of an int8 decode call say it holds dequantized."""
    if temp >= dequantized / 2:
        return "a dequantized copy of the weights"
    if temp >= dequantized / layers / 2:
        return "about one layer dequantized at a time"
    return "no dequantized copy"


def int8_memory(bench: Bench, label: str, model: Model, batch: int) -> bool:
    """The int8 decode memory row of one batch; whether that decode may run (its temp bytes fit
    the device's free memory, or the backend does not say)."""
    layers, itemsize = model.config.num_layers, jnp.dtype(bench.dtype).itemsize
    dequantized = sum(x.size for x in jax.tree.leaves(model.params) if x.dtype == jnp.int8) * itemsize
    since = len(bench.compiles)
    temp = bench.attempt("int8 decode memory", f"{label} batch {batch}", "int8",
                         lambda: int8_temp_bytes(model, batch, bench.shapes), label)  # fmt: skip
    if temp is None:
        return False
    bench.add_compiles(label, f"int8 decode batch {batch}, compiled alone", since)
    mib = (f"{n / 2**20:.1f}" for n in (_bytes(model), dequantized, dequantized / layers, temp))
    bench.rows["int8 decode memory"].append((label, batch, *mib, verdict(temp, dequantized, layers)))
    stats = jax.devices()[0].memory_stats()
    if stats and temp > 0.9 * (stats["bytes_limit"] - stats["bytes_in_use"]):
        bench.note("Decode", f"{label} int8 batch {batch}: not run, its temp bytes exceed the free memory")
        return False
    return True


def run_model(bench: Bench, label: str, config: LlamaConfig, quant: str | None, bandwidth: float | None) -> None:
    """Every item of one model: made, decoded at each batch (int8: its decode memory first, at
    the smallest and largest batch only), prefilled (full precision only)."""
    s, dtype, c = bench.shapes, bench.dtype, config
    weights = quant or dtype
    misfit = bench.misfit(config, weights, prefill=quant is None)
    if misfit:
        bench.note("Models", f"{label}, {weights}: skipped, {misfit}")
        return

    def make() -> Model:
        start = time.perf_counter()
        model = random_model(config, dtype, quant)
        bench.rows["Models"].append((label, f"{c.dim} / {c.ffn_dim} / {c.num_layers} / {c.num_heads} / {c.num_kv_heads} / "
                                     f"{c.head_dim}", weights, f"{_bytes(model) / 2**20:.1f}", f"{time.perf_counter() - start:.1f}"))  # fmt: skip
        return model

    model = bench.attempt("Models", f"{label}, {weights}", "model", make, label)
    if model is None:
        return
    weight_bytes, nominal = _bytes(model), nominal_bandwidth(bench.device_kind)
    kernel = decode_kernel(model.mesh, BLOCK_SIZE, c.head_dim)  # what "auto" runs
    rng = np.random.default_rng(0)
    batches = s.batches
    if quant:
        batches = [b for b in sorted({s.batches[0], s.batches[-1]}) if int8_memory(bench, label, model, b)]

    for batch in batches:
        # a step reads every weight, and each row's keys and values up to its mean position over the run
        kv_bytes = batch * (s.prompt_len + s.new_tokens / 2) * step_kv_bytes(c, model.module.dtype)

        def decode(batch=batch, kv_bytes=kv_bytes, attention="auto"):
            since = len(bench.compiles)
            r = ours(model, rng.integers(3, c.vocab_size - 1, (batch, s.prompt_len)), s.new_tokens, attention)
            steps = r["decode"] / batch  # per second
            share = lambda bw: f"{100 * steps * (weight_bytes + kv_bytes) / bw:.0f}%" if bw else "-"  # noqa: E731
            ran = kernel if attention == "auto" else f"{attention} ({kernel} failed)"
            bench.rows["Decode"].append((label, weights, batch, ran, f"{r['prefill']:.0f}", f"{r['decode']:.1f}",
                                         f"{kv_bytes / 2**20:.3g}", share(bandwidth), share(nominal),
                                         f"{r['temp_mib']:.1f}"))  # fmt: skip
            run = f"{weights} decode batch {batch}" + ("" if attention == "auto" else f", {attention}")
            bench.add_compiles(label, run, since)

        what, failures = f"{label}, {weights}, batch {batch}", len(bench.failed)
        bench.attempt("Decode", what, "decode", decode, label)
        if len(bench.failed) > failures and kernel != "reference":  # a figure through the reference all the same
            reference = functools.partial(decode, attention="reference")
            bench.attempt("Decode", f"{what}, reference attention", "decode", reference, label)

    prefills = () if quant else ((1, s.long_prompt), (s.short_prompts, s.long_prompt // s.short_prompts))
    for count, length in prefills:

        def prefill(count=count, length=length):
            since = len(bench.compiles)
            prompts_PT = rng.integers(3, c.vocab_size - 1, (count, length))
            prefill_seconds(model, prompts_PT, prefill_len(s))  # compiles
            seconds = min(prefill_seconds(model, prompts_PT, prefill_len(s)) for _ in range(2))
            rate = f"{prompts_PT.size / seconds:.0f}"
            bench.rows["Prefill"].append((label, f"{count} x {length}", f"{seconds:.3f}", rate))
            bench.add_compiles(label, f"prefill {count} x {length}", since)

        bench.attempt("Prefill", f"{label}, {count} x {length}", "prefill", prefill, label)
    del model
    gc.collect()  # its weights leave the device before the next model's arrive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), help="default: full on GPU/TPU, tiny on CPU")
    parser.add_argument("--budget-seconds", type=float, default=420, help="checked before each item: what would not fit is skipped (default 420)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "RESULTS.md",
                        help="the results file, this run's section rewritten in it (default: benchmarks/RESULTS.md)")
    parser.add_argument("--device-memory", type=parse_bytes, metavar="SIZE",
                        help="device memory the planner plans for (e.g. 2GiB) when the backend reports none, as on "
                        "CPU: the smoke run's way through the fit checks and the search for 70B-width layers")  # fmt: skip
    args = parser.parse_args()
    shapes_name = args.shapes or ("tiny" if jax.default_backend() == "cpu" else "full")
    bench = Bench(shapes_name, default_dtype(), args.budget_seconds, args.output, args.device_memory)
    s = bench.shapes

    def measure_bandwidth() -> float:
        measured, nominal = memory_bandwidth(), nominal_bandwidth(bench.device_kind)
        bench.rows["Memory bandwidth"].append((f"{measured / 1e9:.1f}", f"{nominal / 1e9:.0f}" if nominal else "unknown",
                                               f"{measured / nominal:.0%}" if nominal else "-"))  # fmt: skip
        return measured

    bandwidth = bench.attempt("Memory bandwidth", "matrix-vector product", "bandwidth", measure_bandwidth)
    (wide_name, wide), (small_name, small) = s.wide, s.small
    check_kernels(bench, wide)
    layers = next((n for n in range(min(MAX_WIDE_LAYERS, wide.num_layers), 0, -1)
                   if not bench.misfit(dataclasses.replace(wide, num_layers=n), bench.dtype)), 1)  # fmt: skip
    models = ((f"{wide_name}, {layers} of {wide.num_layers} layers", dataclasses.replace(wide, num_layers=layers)),
              (f"{small_name}, {small.num_layers} layers", small))  # fmt: skip
    for label, config in models:
        for quant in (None, "int8"):
            run_model(bench, label, config, quant, bandwidth)
    bench.write()
    print(bench.markdown())
    where = f": {'; '.join(bench.failed)}" if bench.failed else ""
    print(f"{len(bench.failed)} item(s) failed{where}; results in {bench.output}")
    sys.exit(1 if bench.failed else 0)


if __name__ == "__main__":
    main()
