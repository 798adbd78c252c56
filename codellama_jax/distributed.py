"""Multi-host start-up: every host runs the same program (SPMD) over one global mesh.

Call `initialize()` before anything else touches JAX. On TPU pods and on GPU clusters under
SLURM or Open MPI, JAX finds the coordinator and this process's rank itself; elsewhere set
CODELLAMA_COORDINATOR (host:port of process 0), CODELLAMA_NUM_PROCESSES and
CODELLAMA_PROCESS_ID on every host, or pass them as arguments.
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "CODELLAMA_COORDINATOR"
ENV_NUM_PROCESSES = "CODELLAMA_NUM_PROCESSES"
ENV_PROCESS_ID = "CODELLAMA_PROCESS_ID"
SHUTDOWN_SECONDS = 30  # the longest `shutdown` waits for the others (JAX's default: 300)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Joins this process to the others (arguments, else the CODELLAMA_* variables, else JAX's
    own cluster detection). A single-process run needs no call at all."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            f"multi-host start-up needs all of the coordinator address, the number of processes and this "
            f"process's id ({ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}), or none of them"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               shutdown_timeout_seconds=SHUTDOWN_SECONDS)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def shutdown() -> None:
    """Leaves the group with the others (a barrier: every process calls it), so that none is
    ended by JAX for outliving process 0's coordination service; nothing to do when not joined."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
