"""Multi-host serving: process 0 plans every step, every process runs the same device calls.

A model too large for one host's devices lives on a mesh spanning several hosts, and every
jitted call on it is one SPMD program that each host's process must join, with the same inputs,
in the same order. So process 0 runs the server and the scheduler, and before each runner call
that touches the device state (`Runner.CALLS`: admit, launch, reset) it publishes the call and
its plan (plain host values: prompts, block tables, sampling settings, drafts) to JAX's own
coordination service, the key-value store `jax.distributed` starts on process 0; the other
processes (workers) read the calls in order and run them on their own devices. Only process 0
reads results.

    process 0:  leader = Leader(); leader.setup(settings, fingerprint); leader.watch(on_lost)
                leader.attach(runner); ...warm up...; leader.wait_ready(); ...serve...; leader.stop()
    workers:    worker = Worker()  # its heartbeat starts
                ...load the model...; settings = worker.setup(fingerprint)
                ...warm up (stopping early when worker.stopping())...; worker.ready(); worker.follow(runner)

Each worker sends a heartbeat (how many calls it has run) every second from a thread of its own,
from its start on; `Leader.watch` calls `on_lost` when one stays unchanged for `timeout` seconds
(the process died or was stopped; a call stuck on its device goes unseen while the thread beats),
so that process 0 can fail its requests and exit for the
orchestrator to restart the group; workers exit when process 0 goes (JAX ends a process whose
coordination service is gone) and when a call fails on them (the processes would no longer run
the same programs). Calls every worker has run are deleted from the store. The store is
unauthenticated: workers unpickle only the runner's plan types and numpy arrays from it, and the
coordinator's port must be reachable by the group's hosts alone.
"""

from __future__ import annotations

import io
import logging
import pickle
import threading
import time
import zlib
from typing import Any, Callable

import jax

log = logging.getLogger(__name__)

PREFIX = "codellama/"
STOP = "stop"
CALLS_PER_DIRECTORY = 1024  # calls are deleted a directory at a time
HEARTBEAT_SECONDS = 1.0
# what a published call may hold: the runner's plans, sampling settings, numpy arrays
ALLOWED = {
    "codellama_jax.runner": {"Prefill", "Fill", "Decode", "Verify"},
    "codellama_jax.sampling": {"SamplingParams"},
    "codellama_jax.speculative": {"Speculation"},
    "numpy": {"dtype", "ndarray"},
    "numpy._core.numeric": {"_frombuffer"},
    "numpy._core.multiarray": {"scalar", "_reconstruct"},
}


def _client():
    """JAX's coordination-service client (after `jax.distributed.initialize`)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("multi-host serving needs jax.distributed.initialize first (codellama_jax.distributed)")
    return client


def _call_key(n: int) -> str:
    return f"{PREFIX}calls/{n // CALLS_PER_DIRECTORY}/{n}"


def _pack(value: Any) -> bytes:
    # bitmasks of free rows are all ones: they compress a thousandfold
    return zlib.compress(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), 1)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name not in ALLOWED.get(module, ()):
            raise pickle.UnpicklingError(f"a published call may not hold {module}.{name}")
        return super().find_class(module, name)


def _unpack(data: bytes) -> Any:
    return _Unpickler(io.BytesIO(zlib.decompress(data))).load()


def _wait(client, key: str, stop: Callable[[], bool] = lambda: False) -> bytes | None:
    """The value of `key` once process 0 has set it (None if `stop()` says to give up first);
    raises when the coordination service is gone."""
    while not stop():
        try:
            return client.blocking_key_value_get_bytes(key, int(HEARTBEAT_SECONDS * 1000))
        except jax.errors.JaxRuntimeError as e:
            if "DEADLINE_EXCEEDED" not in str(e):
                raise
    return None


class Leader:
    """Process 0's side: publishes the server's settings and every runner call, and watches the
    workers' heartbeats."""

    def __init__(self):
        self.client = _client()
        self.workers = tuple(range(1, jax.process_count()))
        self.published = 0
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def setup(self, settings: dict, fingerprint: str) -> None:
        """The scheduler's settings, for the workers to build the same runner (the number of KV
        cache blocks may come from process 0's free memory), and what their model must match."""
        self.client.key_value_set_bytes(f"{PREFIX}setup", _pack((settings, fingerprint)))

    def attach(self, runner) -> None:
        """Publishes each of `runner`'s calls before it runs; its inputs then agree on every
        process, and a call that fails ends the group (`Runner.mirrored`)."""
        runner.announce, runner.mirrored = self.publish, True

    def publish(self, call: str, args: tuple) -> None:
        """Tells the workers to run `call(*args)` on their runner next (`Runner.announce`)."""
        self.client.key_value_set_bytes(_call_key(self.published), _pack((call, args)))
        self.published += 1

    def wait_ready(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Returns once every worker has compiled its shapes (`Worker.ready`), or `stop()` says
        to give up: a request served before would wait inside a collective meanwhile."""
        for worker in self.workers:
            _wait(self.client, f"{PREFIX}ready/{worker}", stop)

    def stop(self) -> None:
        """Stops watching and tells the workers to exit once they have run every call before."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        self.publish(STOP, ())

    def watch(self, on_lost: Callable[[str], None], timeout: float) -> None:
        """Starts a thread that calls `on_lost(reason)` once, when a worker's heartbeat has not
        changed for `timeout` seconds, and meanwhile deletes the calls every worker has run."""
        self._watcher = threading.Thread(target=self._watch, args=(on_lost, timeout), name="codellama-multihost",
                                         daemon=True)  # fmt: skip
        self._watcher.start()

    def _watch(self, on_lost: Callable[[str], None], timeout: float) -> None:
        start = time.monotonic()
        last = {worker: (None, start) for worker in self.workers}  # heartbeat, when it last changed
        deleted = 0  # directories of calls
        while not self._stopping.wait(HEARTBEAT_SECONDS / 2):
            now, done = time.monotonic(), []
            for worker in self.workers:
                try:
                    beat = self.client.key_value_try_get(f"{PREFIX}alive/{worker}")
                except jax.errors.JaxRuntimeError:  # not yet written, or a passing error: the timeout decides
                    beat = None
                if beat is not None and beat != last[worker][0]:
                    last[worker] = (beat, now)
                elif now - last[worker][1] > timeout:
                    on_lost(f"worker process {worker} sent no heartbeat for {timeout:g} s (it died or stopped)")
                    return
                done.append(int(last[worker][0].split()[1]) if last[worker][0] else 0)
            try:
                while (deleted + 1) * CALLS_PER_DIRECTORY <= min(done, default=self.published):
                    self.client.key_value_delete(f"{PREFIX}calls/{deleted}")
                    deleted += 1
            except jax.errors.JaxRuntimeError:
                log.warning("could not delete run calls from the coordination service; trying again", exc_info=True)


class Worker:
    """A worker process's side: a heartbeat from creation on (loading and compiling included, so
    that a worker slower to start than process 0 is not taken for lost), process 0's settings,
    then its runner calls."""

    def __init__(self):
        self.client, self.done = _client(), 0
        self._stopped = threading.Event()
        self._beating = threading.Thread(target=self._beat, name="codellama-heartbeat", daemon=True)
        self._beating.start()

    def _beat(self) -> None:
        key, beat = f"{PREFIX}alive/{jax.process_index()}", 0
        while not self._stopped.is_set():
            try:
                self.client.key_value_set(key, f"{beat} {self.done}", allow_overwrite=True)
                beat += 1
            except jax.errors.JaxRuntimeError:  # passing; if process 0 is gone, JAX ends this process
                log.warning("heartbeat not sent", exc_info=True)
            self._stopped.wait(HEARTBEAT_SECONDS)

    def setup(self, fingerprint: str) -> dict:
        """The settings process 0 publishes (`Leader.setup`), once it has; a ValueError when its
        model (`fingerprint`) differs from this one."""
        settings, theirs = _unpack(_wait(self.client, f"{PREFIX}setup"))
        if theirs != fingerprint:
            raise ValueError(f"process 0 serves another model or layout than this process (process 0: {theirs}; "
                             f"this process: {fingerprint}); every host must run the same command")  # fmt: skip
        return settings

    def stopping(self) -> bool:
        """Whether process 0 has stopped before this worker was ready (a SIGTERM while loading)."""
        try:
            call, _ = _unpack(self.client.key_value_try_get_bytes(_call_key(0)))
        except jax.errors.JaxRuntimeError:
            return False
        return call == STOP

    def ready(self) -> None:
        """Tells process 0 that this worker has compiled its shapes (`Leader.wait_ready`)."""
        self.client.key_value_set(f"{PREFIX}ready/{jax.process_index()}", "1", allow_overwrite=True)

    def follow(self, runner) -> None:
        """Runs process 0's runner calls in order until it publishes `stop`. A call that fails
        here raises: this process no longer runs the same programs as the others, and its exit
        makes process 0 end the group."""
        runner.mirrored = True
        try:
            while True:
                call, args = _unpack(_wait(self.client, _call_key(self.done)))
                if call == STOP:
                    log.info("process 0 stopped the server after %d calls", self.done)
                    return
                if call not in runner.CALLS:
                    raise ValueError(f"process 0 asked for {call!r}, not a runner call ({', '.join(runner.CALLS)})")
                getattr(runner, call)(*args)
                self.done += 1
        finally:
            self._stopped.set()
            self._beating.join()
