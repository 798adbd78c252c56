"""`codellama-convert SRC DST`: a HF checkpoint directory or a GGUF file to our orbax checkpoint."""

from __future__ import annotations

import argparse
import resource
import sys
import time

from codellama_jax import checkpoint
from codellama_jax.convert import open_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="codellama-convert",
        description="Convert a Hugging Face Llama checkpoint (directory with config.json and safetensors) "
        "or a llama.cpp .gguf file into a codellama-jax orbax checkpoint, one tensor at a time.",
    )
    parser.add_argument("src", help="HF checkpoint directory, or a .gguf file (dequantized on the way)")
    parser.add_argument("dst", help="output directory; must not exist yet (written atomically)")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=sorted(checkpoint.DTYPES),
        help="parameter dtype stored in the checkpoint (default: bfloat16)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        help="store matmul weights and the embedding as int8 with a float32 scale per output channel "
        "(about half the bytes of bfloat16); norms stay in --dtype",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        source = open_checkpoint(args.src)
        c = source.config
        if not args.quiet:
            print(
                f"{args.src}: {c.num_layers} layers, dim {c.dim}, {c.num_heads} heads / {c.num_kv_heads} kv heads, "
                f"vocab {c.vocab_size}, {c.num_params / 1e9:.2f}B parameters -> {args.dtype}"
                + (f", {args.quantize} weights" if args.quantize else ""),
                file=sys.stderr,
            )
        dst = checkpoint.convert(
            source, args.dst, dtype=args.dtype, quantize=args.quantize, progress=not args.quiet
        )
    except (OSError, ValueError, KeyError) as e:
        print(f"codellama-convert: error: {e}", file=sys.stderr)
        return 1
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not args.quiet:
        print(f"wrote {dst} in {time.perf_counter() - start:.1f}s (peak RSS {peak_mib:.0f} MiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
