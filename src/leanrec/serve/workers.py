"""``leanrec serve --workers N``: N serving processes on one host, one port each, for nginx to route to.

uvicorn's own ``--workers`` share one socket and the kernel hands each connection to any of them,
so a request's later calls would land on a process that does not hold its frozen features. Here each
process listens on a port of its own (``port``, ``port + 1``, ...) and nginx, configured by
:func:`~leanrec.serve.routing.nginx_conf`, sends every call of a request to the process that ranked
it. Each process is a whole ``leanrec serve``: its own world or catalog, its own logging lane and
its own context cache, bounded by ``context_max_bytes`` (so N processes hold at most N times it).
They share the backends and the token secret, so a token any of them signed is checked by all.

Each worker's numpy runs its BLAS on ``cores // N`` threads (at least one), unless the environment
already sets ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``: with every process
on as many threads as the host has cores, the processes' threads outnumber the cores, and OpenBLAS's
threads spin while they wait for a core (``benchmarks/scale_out.py`` measured it).

The parent process only starts, watches and stops them: SIGTERM or Ctrl-C stops every worker; a
worker that exits on its own stops the others too, and the command exits with an error naming it,
rather than serving on with a hole in the hash ring that nginx would paper over by sending that
worker's share of the requests, and their later calls, elsewhere.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import httpx

from leanrec.errors import InputError
from leanrec.serve.config import ServeConfig
from leanrec.serve.routing import PROCESS_KEEP_ALIVE_S

_NOT_ANSWERING = "; start it, or give --store-url and --bus-url a server that answers"
READY_TIMEOUT_S = 180.0  # a worker builds its world (or loads its catalog) before it answers
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def open_app(config: ServeConfig) -> Any:
    """The app of one serving process, with the backends' refusals as one-line errors.

    Raises:
        InputError: A backend does not answer, or Redis refuses the setup.

    """
    import redis.exceptions

    from leanrec.serve.app import create_app

    try:
        return create_app(config)
    except ConnectionError as exc:  # the Redis backends name the server that does not answer
        raise InputError(f"{exc}{_NOT_ANSWERING}") from None
    except redis.exceptions.ResponseError as exc:  # it answers, and refuses the setup (e.g. SELECT)
        raise InputError(
            f"Redis refused to open the store or the bus: {exc}; check the database number of "
            "--store-url and --bus-url"
        ) from None


def serve_one(config: ServeConfig, app: Any = None) -> None:
    """Serve one process on ``config.port`` until SIGTERM or SIGINT (uvicorn's handling).

    Args:
        config: What to serve, and where.
        app: The app, if the caller opened it already (to report a bad setting before it serves).

    """
    import uvicorn

    uvicorn.run(
        app if app is not None else open_app(config),
        host=config.host,
        port=config.port,
        log_level="warning",
        timeout_keep_alive=PROCESS_KEEP_ALIVE_S,
    )


def _worker(config: ServeConfig) -> None:
    """A worker process's entry: a user's mistake is one line on stderr and exit code 2."""
    try:
        serve_one(config)
    except InputError as exc:
        sys.stderr.write(f"error: worker on port {config.port}: {' '.join(str(exc).split())}\n")
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group, before uvicorn's handler too
        pass


def blas_threads(workers: int) -> int:
    """BLAS threads per worker: the cores this process may run on, shared out, at least one each."""
    return max(1, len(os.sched_getaffinity(0)) // workers)


@contextlib.contextmanager
def _worker_environment(workers: int) -> Iterator[None]:
    """``os.environ`` for starting the workers: their BLAS threads set, unless the user set them."""
    if any(name in os.environ for name in THREAD_VARIABLES):
        yield
        return
    threads = str(blas_threads(workers))
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, threads))
    try:
        yield
    finally:
        for name in THREAD_VARIABLES:
            os.environ.pop(name, None)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2.0).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def run_workers(
    config: ServeConfig,
    ports: list[int],
    status: Callable[[str], None],
    stop: threading.Event | None = None,
) -> int:
    """Run one serving process per port until stopped; returns 0.

    Args:
        config: The settings every worker shares (its port is replaced by each worker's).
        ports: One port per worker.
        status: Called with a line per started worker (its pid and URL), then once all answer.
        stop: Set to stop the workers (from another thread); SIGTERM and SIGINT stop them too.

    Raises:
        InputError: A worker exited on its own (the others are stopped first).

    """
    stop = stop or threading.Event()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked loop or thread
    procs: list[tuple[int, BaseProcess]] = []
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def _on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        with _worker_environment(len(ports)):  # a spawned worker starts with the environment as it is now
            for k, port in enumerate(ports):
                proc = context.Process(
                    target=_worker, args=(replace(config, port=port),), name=f"leanrec-{port}"
                )
                proc.start()
                procs.append((port, proc))
                status(f"worker {k}: pid {proc.pid}, http://{config.host}:{port}")
            threads = next((os.environ[n] for n in THREAD_VARIABLES if n in os.environ), "?")
            status(f"numpy's BLAS on {threads} thread(s) in each worker")
        waiting = {port for port, _ in procs}
        started = time.monotonic()
        while not stop.is_set():
            ended = [(port, p) for port, p in procs if not p.is_alive()]
            if ended:
                port, p = ended[0]
                raise InputError(
                    f"the worker on port {port} exited (code {p.exitcode}); the other workers were stopped"
                )
            if waiting:
                waiting = {port for port in waiting if not _answers(f"http://{config.host}:{port}")}
                if not waiting:
                    status(f"all {len(procs)} workers answer")
                elif time.monotonic() - started > READY_TIMEOUT_S:
                    raise InputError(
                        f"workers on ports {sorted(waiting)} did not answer in {READY_TIMEOUT_S:.0f} s"
                    )
            wait([p.sentinel for _, p in procs], timeout=0.2 if waiting else 1.0)
    finally:
        for _, p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn finishes the calls in flight and exits
        deadline = time.monotonic() + 15.0
        for _, p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 0.1))
            if p.is_alive():
                p.kill()
                p.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
