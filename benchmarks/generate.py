"""Prefill and decode speed of codellama-jax next to transformers' `generate` on the same weights.

    python benchmarks/generate.py                                   # SmolLM2-135M, batch 1 8 32
    python benchmarks/generate.py --random dim=1024,ffn=2816,layers=8,heads=16,kv_heads=4,vocab=32016
    python benchmarks/generate.py --batches 1 8 --new-tokens 32 --skip-transformers --no-scan-layers
    python benchmarks/generate.py --model /ckpt/codellama-70b --dtype bfloat16 --mesh 1x8 --skip-transformers

Every row says how far decode is from the memory-bandwidth bound: a decode step must read every
weight once, so batch-B decode cannot exceed B * bandwidth * devices / weight bytes tokens/s
(bandwidth of one device, measured here with a matrix-vector product), and next to the "matmul floor": the rate of
the model's weight matmuls alone, run back to back through XLA, which no full step can beat on
the same backend. "temp MiB" is the decode loop's working memory as XLA compiled it: with int8
weights, a figure near the dequantized weights' size means XLA keeps a full-precision copy of
them (as XLA:CPU does). Stop tokens are suppressed on both sides so
every row decodes exactly `--new-tokens` tokens. llama.cpp (llama-cpp-python) is a third column
at batch 1 when it is installed and the model is a GGUF file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from codellama_jax import load, make_mesh
from codellama_jax.demo_model import fetch_smollm2
from codellama_jax import buckets
from codellama_jax.generation import GENERATE_STEPS
from codellama_jax.model import Proj
from codellama_jax.sampling import SamplingParams
from codellama_jax.scheduler import Scheduler

REPO = Path(__file__).resolve().parents[1]


def memory_bandwidth() -> float:
    """Bytes/s of one device reading a float32 matrix in a matrix-vector product (best of 5):
    BLAS over 256 MiB on CPU, XLA over 2 GiB on an accelerator."""
    if jax.default_backend() == "cpu":
        w = np.random.default_rng(0).random((8192, 8192), dtype=np.float32)
        x = np.ones(8192, np.float32)
        best = min(_seconds(lambda: w @ x) for _ in range(5))
    else:
        w, x = jnp.ones((16384, 32768), jnp.float32), jnp.ones(16384, jnp.float32)
        matvec = jax.jit(lambda x, w: x @ w)
        matvec(x, w).block_until_ready()
        best = min(_seconds(lambda: matvec(x, w).block_until_ready()) for _ in range(5))
    return w.nbytes / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours(model, prompts: np.ndarray, new_tokens: int, decode_attention: str = "auto") -> dict:
    """Compile, prefill and decode rates of one batch through the library's own scheduler, as
    generate() runs it: prefill from a run of one token per row, decode from a run of
    `new_tokens` minus that (as transformers' rates are taken). `decode_attention`: the
    scheduler's (attention.decode_kernel)."""
    suppress = {int(t): -100.0 for t in model.stop_token_ids}
    rows = [list(map(int, p)) for p in prompts]
    max_len = prompts.shape[1] + new_tokens

    def run(tokens) -> tuple[Scheduler, float]:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, logit_bias=suppress)
        scheduler = Scheduler(model, max_batch=len(rows), max_len=max_len, steps_per_call=GENERATE_STEPS,
                              decode_attention=decode_attention)
        done = []
        start = time.perf_counter()
        for row in rows:
            scheduler.add(scheduler.sequences(row, params, lambda i: done.append))
        while scheduler.has_work():
            scheduler.step()
        seconds = time.perf_counter() - start
        assert sum(c.completion_tokens for c in done if c.finish_reason) == len(rows) * tokens, "a row stopped early"
        return scheduler, seconds

    start = time.perf_counter()
    run(1), run(new_tokens)  # compiles every shape of both runs
    compile_s = time.perf_counter() - start
    first = min(run(1)[1] for _ in range(2))
    scheduler, total = run(new_tokens)
    compiled = scheduler.runner.compile_decode(len(rows), buckets.window_bucket(max_len, scheduler.max_len), GENERATE_STEPS)
    return {
        "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
        "compile_s": compile_s,
        "prefill": prompts.size / first,
        "decode": len(rows) * (new_tokens - 1) / (total - first),
    }


def matmul_floor(model, batch: int) -> float:
    """Tokens/s of the weight matmuls alone (each projection as the model applies it, nothing
    else), one after another with the shapes of a decode step: what XLA's matrix products allow
    here, the practical ceiling for a full step on the same backend."""

    @jax.jit
    def chain(params):
        module = nnx.merge(model.graphdef, params)
        y = jnp.full((batch, 1), 1e-3, module.dtype)
        for _, proj in nnx.iter_graph(module):
            if isinstance(proj, Proj):  # each product waits for the one before, as layers do
                in_shape = proj.kernel.shape[: proj.num_in]
                first = y.reshape(batch, -1)[:, :1].reshape(batch, *(1,) * len(in_shape))
                y = proj(jnp.broadcast_to(first, (batch, *in_shape)))
        if module.lm_head is None:
            y = module.head(jnp.broadcast_to(y.reshape(batch, -1)[:, None, :1], (batch, 1, module.config.dim)))
        return y

    chain(model.params).block_until_ready()
    best = min(_seconds(lambda: chain(model.params).block_until_ready()) for _ in range(10))
    return batch / best


def transformers_rates(hf_model, prompts: np.ndarray, new_tokens: int) -> dict:
    """Prefill from a forward pass; decode from generate(N) minus generate(1)."""
    import torch

    ids = torch.tensor(prompts)

    def gen(n):
        with torch.no_grad():
            hf_model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    gen(2)  # warm up
    with torch.no_grad():
        prefill_s = _seconds(lambda: hf_model(ids))
    t1, tn = _seconds(lambda: gen(1)), _seconds(lambda: gen(new_tokens))
    return {"prefill": prompts.size / prefill_s, "decode": prompts.shape[0] * (new_tokens - 1) / (tn - t1)}


def llama_cpp_rate(gguf_path: Path, prompt: list[int], new_tokens: int) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(str(gguf_path), n_ctx=len(prompt) + new_tokens + 8, verbose=False)
    llm.eval(prompt)
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = llm.sample(temp=0.0)
        llm.eval([token])
    return new_tokens / (time.perf_counter() - start)


def random_checkpoint(spec: str, directory: Path) -> Path:
    import torch
    import transformers

    fields = dict(kv.split("=") for kv in spec.split(","))
    names = {"dim": "hidden_size", "ffn": "intermediate_size", "layers": "num_hidden_layers",
             "heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "vocab": "vocab_size"}  # fmt: skip
    config = transformers.LlamaConfig(**{names[k]: int(v) for k, v in fields.items()}, max_position_embeddings=4096)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint to run (default: the SmolLM2-135M demo GGUF)")
    parser.add_argument("--random", help="also run a random model: dim=,ffn=,layers=,heads=,kv_heads=,vocab=")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quantize", choices=["int8"], help="int8 weights (the bound then counts int8 bytes)")
    parser.add_argument("--mesh", help="DATAxMODEL device mesh, e.g. 1x8 (default: one device)")
    parser.add_argument("--no-scan-layers", dest="scan_layers", action="store_false", help="unrolled layers (load's scan_layers)")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    bandwidth = memory_bandwidth()
    print(f"device: {jax.devices()[0].device_kind}; memory bandwidth (BLAS matvec): {bandwidth / 1e9:.1f} GB/s")
    models = [Path(args.model) if args.model else fetch_smollm2(REPO / ".cache" / "models")]
    tmp = tempfile.TemporaryDirectory()
    if args.random:
        models.append(random_checkpoint(args.random, Path(tmp.name) / "random"))

    header = (
        f"{'model':<28}{'batch':>6}{'compile s':>10}{'prefill tok/s':>15}{'decode tok/s':>14}"
        f"{'% of bound':>11}{'matmul floor':>13}{'temp MiB':>9}{'hf decode':>11}{'vs hf':>7}{'llama.cpp':>11}"
    )
    print(header)
    for path in models:
        mesh = make_mesh(tuple(map(int, args.mesh.split("x")))) if args.mesh else None
        model = load(path, dtype=args.dtype, quantize=args.quantize, mesh=mesh, scan_layers=args.scan_layers)
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
        hf_model = None if args.skip_transformers else _transformers_model(path)
        rng = np.random.default_rng(0)
        for batch in args.batches:
            prompts = rng.integers(3, model.config.vocab_size - 1, (batch, args.prompt_len))
            mine = ours(model, prompts, args.new_tokens)
            floor = matmul_floor(model, batch)
            bound = batch * bandwidth * model.mesh.size / weight_bytes  # every device reads its shard
            hf = transformers_rates(hf_model, prompts, args.new_tokens) if hf_model is not None else None
            cpp = llama_cpp_rate(path, prompts[0].tolist(), args.new_tokens) if batch == 1 and path.suffix == ".gguf" else None
            print(
                f"{path.name[:27]:<28}{batch:>6}{mine['compile_s']:>10.1f}{mine['prefill']:>15.0f}{mine['decode']:>14.1f}"
                f"{100 * mine['decode'] / bound:>10.0f}%{floor:>13.1f}{mine['temp_mib']:>9.0f}"
                + (f"{hf['decode']:>11.1f}{mine['decode'] / hf['decode']:>6.2f}x" if hf else f"{'-':>11}{'-':>7}")
                + (f"{cpp:>11.1f}" if cpp else f"{'-':>11}")
            )


def _transformers_model(path: Path):
    import torch
    import transformers

    if path.suffix == ".gguf":
        return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


if __name__ == "__main__":
    main()
