"""Compile time: independent of depth (layers are scanned), and paid once (persistent cache).

    python benchmarks/compile.py                       # 4 vs 80 layers; two server starts
    python benchmarks/compile.py --layers 2 4 --restart-max-len 64 --model /path/to/tiny

Depth: a narrow random model (dim 256, 8 heads, 1 kv head, CodeLlama's vocabulary) at each
`--layers`; the first request of a new shape (prefill and decode compile) against a second one
of the same shape (which compiles nothing); the difference is that shape's compile time, and the
ratio to the shallowest model is printed. Restart: `codellama-serve` started twice on one fresh
compile-cache directory; seconds from launch to "serving", both printed, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from codellama_jax import generate, load
from codellama_jax.demo_model import fetch_smollm2

REPO = Path(__file__).resolve().parents[1]


def depth_compile_seconds(layers: int, directory: Path) -> float:
    """Seconds the first 100-token request of a new model spends compiling."""
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                                      num_attention_heads=8, num_key_value_heads=1, vocab_size=32016,
                                      max_position_embeddings=1024)  # fmt: skip
    torch.manual_seed(0)
    path = directory / f"layers{layers}"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    model = load(path, dtype="float32")
    prompt = list(range(3, 103))

    def request() -> float:
        start = time.perf_counter()
        generate(model, [prompt], temperature=0.0, max_tokens=8)
        return time.perf_counter() - start

    first = request()
    return first - min(request() for _ in range(2))


def seconds_to_serving(model: str, cache: Path, max_len: int) -> float:
    """Launch to the "serving" log line of one server start (then stopped by its pid)."""
    command = [sys.executable, "-m", "codellama_jax.serving", "--model", model, "--port", "0",
               "--compile-cache", str(cache), "--max-len", str(max_len), "--max-batch", "4"]  # fmt: skip
    start = time.perf_counter()
    server = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        for line in server.stderr:
            if " serving " in line:
                return time.perf_counter() - start
        raise RuntimeError(f"the server exited with {server.wait()} before serving")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 80])
    parser.add_argument("--model", help="checkpoint the restart test serves (default: the SmolLM2-135M demo GGUF)")
    parser.add_argument("--restart-max-len", type=int, default=2048, help="--max-len of the served model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'layers':>7}{'compile s':>11}{'vs fewest':>11}")
        base = None
        for layers in sorted(args.layers):
            seconds = depth_compile_seconds(layers, Path(tmp))
            base = base or seconds
            print(f"{layers:>7}{seconds:>11.2f}{seconds / base:>10.2f}x")
        model = args.model or str(fetch_smollm2(REPO / ".cache" / "models"))
        cache = Path(tmp) / "xla-cache"
        cold, warm = (seconds_to_serving(model, cache, args.restart_max_len) for _ in range(2))
        entries = len(os.listdir(cache)) if cache.exists() else 0
        print(f"server start to serving (--max-len {args.restart_max_len}): first {cold:.1f} s, second {warm:.1f} s "
              f"with the compile cache ({entries} entries): {cold / warm:.1f}x faster")  # fmt: skip


if __name__ == "__main__":
    main()
