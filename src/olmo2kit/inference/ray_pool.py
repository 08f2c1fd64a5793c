"""Units of work fanned out as Ray tasks, their results handed back to the one driver that writes them.

Workers compute, the driver owns the output (Ray's own pattern): a lost worker means a retried unit, never a
half-written file. Ray is an optional extra, imported only here and only when a pool is made.

    >>> pool = RayPool(RayOptions(address="local", cpus=1))  # doctest: +SKIP
    >>> for done in pool.map(measure, {"a": ("a",), "b": ("b",)}):  # doctest: +SKIP
    ...     print(done.key, done.value, done.error)
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from olmo2kit.errors import Olmo2KitError

LOCAL = "local"  # the address that starts a Ray of this machine's own


@dataclass(frozen=True)
class RayOptions:
    """Where the tasks run and what each asks for. `address`: "local" starts a Ray on this machine (loopback, no
    dashboard), "auto" joins the one running here, "HOST:PORT" or "ray://HOST:PORT" a cluster's head. `gpus`
    None asks for one GPU per task where the cluster has any, none where it has not. A unit that fails is tried
    again up to `retries` times (a lost worker or an exception alike), then reported."""

    address: str = LOCAL
    cpus: float = 1
    gpus: float | None = None
    retries: int = 2


@dataclass
class UnitDone:
    """One unit finished: its key, and either the function's value or `error`, one line saying why it failed."""

    key: Any
    value: Any = None
    error: str | None = None


class RayPool:
    """A connection to Ray (joined or started) and the resources each task asks for. Making one checks the
    options against the cluster, so a bad address or too many GPUs fail before any work starts."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self._ray = _import_ray()
        self.started = False
        if options.address not in (LOCAL, "auto") and not options.address.startswith("ray://"):
            _check_reachable(options.address)
        if not self._ray.is_initialized():
            _connect(self._ray, options)
            self.started = options.address == LOCAL
        self.cpus, self.gpus = self._check_resources()

    def _check_resources(self) -> tuple[float, float]:
        options = self.options
        if options.cpus < 0 or (options.gpus is not None and options.gpus < 0):
            raise Olmo2KitError("--ray-cpus and --ray-gpus must be 0 or more")
        if options.retries < 0:
            raise Olmo2KitError(f"retries must be 0 or more, not {options.retries}")
        total = self._ray.cluster_resources()
        have_gpus, have_cpus = total.get("GPU", 0), total.get("CPU", 0)
        gpus = (1 if have_gpus else 0) if options.gpus is None else options.gpus
        if gpus > have_gpus:
            raise Olmo2KitError(f"--ray-gpus {gpus:g}: the Ray cluster has {have_gpus:g} GPUs; "
                                "ask for fewer, or leave --ray-gpus out to run on CPUs where there is no GPU")
        if options.cpus > have_cpus:
            raise Olmo2KitError(f"--ray-cpus {options.cpus:g}: the Ray cluster has {have_cpus:g} CPUs; ask for fewer")
        return options.cpus, gpus

    def map(self, function: Callable, units: dict[Any, tuple]) -> Iterator[UnitDone]:
        """Run `function(*args)` as one Ray task per unit ({key: args}) and yield each as it finishes, in the
        order they finish. `function` (a function or a callable object) is sent to the workers, so what it needs
        must be importable there."""
        ray = self._ray
        task = ray.remote(_run_unit).options(num_cpus=self.cpus, num_gpus=self.gpus,
                                            max_retries=self.options.retries, retry_exceptions=True)
        pending = {task.remote(function, *args): key for key, args in units.items()}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(ready[0])
            try:
                yield UnitDone(key, value=ray.get(ready[0]))
            except ray.exceptions.RayError as e:
                yield UnitDone(key, error=_failure(e))

    def close(self) -> None:
        """Stop the Ray this pool started (one it joined is left running)."""
        if self.started:
            self._ray.shutdown()
            self.started = False


def _run_unit(function: Callable, *args: Any) -> Any:
    """The one Ray task: Ray's remote functions are plain functions, the unit may be a callable object."""
    return function(*args)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise Olmo2KitError("--ray needs Ray: pip install 'olmo2kit[ray]'") from None
    return ray


def _connect(ray, options: RayOptions) -> None:
    address = options.address
    if address == LOCAL:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
        return
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise Olmo2KitError(f"--ray {address}: no Ray cluster there ({_first_line(e)}): start one with "
                            "`ray start --head`, or give --ray local") from None


def _check_reachable(address: str) -> None:
    """Fail in seconds on a head that does not answer (Ray itself keeps trying for a minute)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise Olmo2KitError(f"--ray {address}: give local, auto or HOST:PORT of a Ray head")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise Olmo2KitError(f"--ray {address}: cannot reach a Ray head there ({e.strerror or e}): start one with "
                            "`ray start --head`, or give --ray local") from None


def _failure(error: Exception) -> str:
    """One line for a unit that failed for good: the worker's own exception where there is one."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, Olmo2KitError):
        return _first_line(cause)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {_first_line(cause)}"
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
