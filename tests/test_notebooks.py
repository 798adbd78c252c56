"""The notebooks run top to bottom without an error in a fresh kernel (nbclient), so they cannot
rot, and the committed copies carry the outputs of such a run."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["quickstart", "sharding", "convert_and_serve"])
def test_the_notebook_runs_and_is_saved_with_its_outputs(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    saved = nbformat.read(path, as_version=4)
    code = [cell for cell in saved.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count for cell in code), "saved without running it"
    assert sum(bool(cell.outputs) for cell in code) >= len(code) // 2, "saved without its outputs"
    fresh = nbformat.read(path, as_version=4)
    ours: dict[int, psutil.Process] = {}  # the kernel and what it started: this test's own processes

    def note_descendants(**_):
        for process in psutil.Process().children(recursive=True):
            ours.setdefault(process.pid, process)

    # someone else's server on this machine (not ours: detached), by its command line: it must survive
    launched = subprocess.run(["sh", "-c", f'"{sys.executable}" -c "import time; time.sleep(900)" codellama_jax.serving '
                               "> /dev/null 2>&1 & echo $!"], capture_output=True, text=True, check=True)  # fmt: skip
    bystander = psutil.Process(int(launched.stdout))
    start = time.perf_counter()
    client = NotebookClient(fresh, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}},
                            on_cell_executed=note_descendants)  # fmt: skip
    try:
        client.execute()
    finally:  # a notebook that failed half-way must not leave its server running
        for process in ours.values():
            with contextlib.suppress(psutil.Error):
                if process.is_running():  # the same process (psutil checks its start time), not a reused pid
                    process.kill()
        alive = bystander.is_running()
        bystander.kill()
    assert alive, "the notebook test stopped a process it did not start"
    print(f"\n{name}.ipynb ran in {time.perf_counter() - start:.0f} s")
