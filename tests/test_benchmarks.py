"""Every benchmark script runs end to end at its smallest settings (no figure is asserted), so
that the commands the README quotes cannot rot."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import KEY, NAME, REPO, running_server, write_hf_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sp_dir):
    return write_hf_checkpoint(tmp_path_factory.mktemp("bench") / "tiny", sp_dir, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory, sp_dir):
    """Room for the chat workload's conversations (the others keep 128 tokens: fewer shapes)."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("bench") / "tiny_long", sp_dir, num_key_value_heads=2,
                               max_position_embeddings=512)


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_generate_benchmark(tiny):
    out = _run("benchmarks/generate.py", "--model", str(tiny), "--batches", "1", "2", "--prompt-len", "8",
               "--new-tokens", "4", "--no-scan-layers")  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("tiny")]
    assert len(rows) == 2 and "x" in rows[1], out  # both batches, with the transformers ratio


def test_structured_benchmark(tiny):
    out = _run("benchmarks/structured.py", "--model", str(tiny), "--batches", "2", "--new-tokens", "4")
    assert len([line for line in out.splitlines() if line.split()[:1] == ["2"]]) == 1, out


def test_speculative_benchmark(tiny_long):
    out = _run("benchmarks/speculative.py", "--model", str(tiny_long), "--new-tokens", "12", "--repeats", "1",
               "--num-tokens", "2", "--ngram-min", "1", "--lines", "3")  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["edit"], ["prose"])]
    assert len(rows) == 2 and all(row[-1] == "True" for row in rows), out  # identical text with and without


def test_serve_benchmark(tiny_long):
    from codellama_jax import load

    with running_server(load(tiny_long), max_batch=2) as (url, _, _):  # compared with itself, and with the library
        out = _run("benchmarks/serve.py", "--url", url, "--api-key", KEY, "--model", NAME, "--clients", "1", "2",
                   "--seconds", "2", "--max-tokens", "4", "--against", url, "--against-key", KEY,
                   "--against-model", NAME, "--library", str(tiny_long), "--library-no-scan-layers")  # fmt: skip
        chat = _run("benchmarks/serve.py", "--url", url, "--api-key", KEY, "--model", NAME, "--clients", "2",
                    "--seconds", "4", "--max-tokens", "4", "--workload", "chat", "--turns", "2", "--system-rules", "2",
                    "--rounds", "1", "--against", url, "--against-key", KEY, "--against-model", NAME)  # fmt: skip
    lines = out.strip().splitlines()
    assert len(lines) == 11 and "x generate() at batch 1" in out and "2 client(s):" in lines[-1], out
    assert "later p50 s" in chat and "ours: prefix cache hit rate" in chat and "later turns'" in chat, chat


def test_compile_benchmark(tiny):
    out = _run("benchmarks/compile.py", "--layers", "1", "2", "--model", str(tiny), "--restart-max-len", "64")
    assert "server start to serving" in out and len([line for line in out.splitlines() if line.endswith("x")]) == 2, out


def test_long_prompt_benchmark(tiny):
    out = _run("benchmarks/long_prompt.py", "--model", str(tiny), "--prompt-tokens", "60", "--rows", "2", "--chunk", "16",
               "--max-len", "128", "--steps", "2", "--no-scan-layers")  # fmt: skip
    assert "in chunks of 16" in out and "whole" in out and "is the same chunked and whole" in out, out


def test_accelerator_benchmark(tmp_path):
    """Tiny shapes on CPU, the kernels in interpret mode, planned for a device of 2.6 MiB (CPU
    reports none): the tiny 70B-like model gets 1 of its 2 layers and still does not fit in
    float32 (skipped: not a failure), its int8 weights and the 7B-like model do. No item may fail
    (the script would exit 1), and every table gets rows: a budget the run stays well within."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# Accelerator results\n\n## NVIDIA H200, 2026-11-30\n\n- its figures\n\n"
                       "## cpu, tiny shapes, 2026-11-29\n\n- an older run's figures\n")  # fmt: skip
    out = _run("benchmarks/accelerator.py", "--shapes", "tiny", "--output", str(results), "--budget-seconds", "150",
               "--device-memory", "2.6MiB")  # fmt: skip
    text = results.read_text()
    assert "failed:" not in text and "failed:" not in out and out.splitlines()[-1].startswith("0 item(s) failed"), out
    section = text[: text.index("## NVIDIA H200")]
    for title in ("Memory bandwidth", "Models", "Decode attention: kernel against reference", "Decode",
                  "int8 decode memory", "Prefill", "Compile times"):  # fmt: skip
        assert f"\n### {title}\n" in section and f"\n### {title}\n" in out, out
        table = section.split(f"\n### {title}\n")[1].split("\n### ")[0]
        assert len([line for line in table.splitlines() if line.startswith("| ")]) >= 2, (title, out)  # header, a row
    # the memory planner ran: the layer search, a skip for memory, and what fits
    assert "tiny 70B-like, 1 of 2 layers, float32: skipped, the planner counts" in section, out
    assert "| tiny 70B-like, 1 of 2 layers | int8 | 2 |" in section and "| tiny 7B-like, 2 layers | float32 | 2 |" in section
    # this device's section first, in place of its older one; another device's kept
    assert text.index("## cpu, tiny shapes, ") < text.index("## NVIDIA H200, 2026-11-30"), text
    assert "its figures" in text and "older run" not in text, text
