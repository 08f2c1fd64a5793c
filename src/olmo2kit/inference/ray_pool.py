"""Units of work fanned out as Ray tasks, their results handed back to the one driver that writes them.

Workers compute, the driver owns the output (Ray's own pattern): a lost worker means a retried unit, never a
half-written file. Ray is an optional extra, imported only here and only when a pool is made.

    >>> pool = RayPool(RayOptions(address="local", cpus=1))  # doctest: +SKIP
    >>> for done in pool.map(measure, {"a": ("a",), "b": ("b",)}):  # doctest: +SKIP
    ...     print(done.key, done.value, done.error)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from olmo2kit.errors import Olmo2KitError

LOCAL = "local"  # the address that starts a Ray of this machine's own
AUTO = "auto"  # the Ray running here (RAY_ADDRESS, else the one `ray start` recorded on this machine)
CLIENT = "ray://"  # Ray Client's scheme: a driver outside the cluster


@dataclass(frozen=True)
class RayOptions:
    """Where the tasks run and what each asks for. `address`: "local" starts a Ray on this machine (loopback, no
    dashboard), "auto" joins the one running here, "HOST:PORT" or "ray://HOST:PORT" a cluster's head. `gpus`
    None asks for one GPU per task where the cluster has any, none where it has not. A unit that raises an
    exception or loses its worker is tried again up to `retries` times, then reported; one that raises an
    Olmo2KitError (the user's mistake: bad data, a checkpoint that cannot load) is reported at once.
    Making one checks the values (an Olmo2KitError naming the option), before anything connects."""

    address: str = LOCAL
    cpus: float = 1
    gpus: float | None = None
    retries: int = 2

    def __post_init__(self) -> None:
        for option, value in (("--ray-cpus", self.cpus), ("--ray-gpus", self.gpus)):
            if value is not None and not 0 <= value < math.inf:
                raise Olmo2KitError(f"{option} {value:g}: give 0 or more (a share of one, such as 0.5, is fine)")
            if value and value < RESOURCE_UNIT:
                raise Olmo2KitError(f"{option} {value:g}: give 0, or {RESOURCE_UNIT:g} or more (Ray counts shares "
                                    f"of one to {RESOURCE_UNIT:g})")
        if self.gpus == 0:
            _some_resource(self.cpus, self.gpus)
        if not 0 <= self.retries <= MAX_RETRIES:
            raise Olmo2KitError(f"--ray-retries {self.retries}: give 0 to {MAX_RETRIES}")
        if self.address not in (LOCAL, AUTO):
            _host_port(self.address.removeprefix(CLIENT), self.address)


# Ray refuses a share finer than this ("cannot go beyond 0.0001"): ray/_common/ray_option_utils.py,
# _validate_resource_quantity (RESOURCE_UNIT_SCALING is 10000).
RESOURCE_UNIT = 0.0001
# Tries again of a failing unit: more is a loop, not a retry (and Ray overflows on a huge count).
MAX_RETRIES = 100


def _some_resource(cpus: float, gpus: float) -> None:
    """A task that asks for nothing runs beside every other: Ray would start every unit at once (each loading a
    model: out of memory on a real one)."""
    if not cpus and not gpus:
        raise Olmo2KitError("--ray-cpus 0 with --ray-gpus 0: each task would ask for nothing and Ray would run every "
                            "unit at once; give a task a share of a CPU or a GPU")


@dataclass
class UnitDone:
    """One unit finished: its key, and either the function's value or `error`, one line saying why it failed."""

    key: Any
    value: Any = None
    error: str | None = None


class RayPool:
    """A connection to Ray (joined, or started with `local` where none runs in this process) and the resources
    each task asks for. Making one checks the address and the options against the cluster, so a bad address or
    too many GPUs fail in seconds, before any work starts. `close()` (or leaving a `with` block) stops a Ray it
    started."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self._ray = _import_ray()
        self.started = False
        self.joined = self._ray.is_initialized()  # a Ray this process runs already: used whatever the address
        if not self.joined:
            _connect(self._ray, options)
            self.started = options.address == LOCAL
        try:
            self.cpus, self.gpus = self._check_resources()
        except Olmo2KitError:
            self.close()
            raise

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_resources(self) -> tuple[float, float]:
        options = self.options
        self.total = self._ray.cluster_resources()
        # A task runs on one node: it must fit one, not the cluster's total (Ray would keep it waiting, silently).
        self.nodes = [node["Resources"] for node in self._ray.nodes() if node.get("Alive")]
        gpus = (1 if self.total.get("GPU", 0) else 0) if options.gpus is None else options.gpus
        _some_resource(options.cpus, gpus)
        check_fits(self.nodes, options.cpus, gpus)
        return options.cpus, gpus

    def describe(self) -> str:
        """One line for people: where the tasks run and what each asks for."""
        address = self.options.address
        if not address.startswith(CLIENT):  # the address it runs on, not the one asked for ("auto", say)
            address = self._ray.get_runtime_context().gcs_address
        at = ("a Ray started here" if self.started else f"the Ray this process runs already, at {address}"
              if self.joined else f"the cluster at {address}")
        return (f"{at}: {_count(self.total.get('CPU', 0), 'CPU')}, {_count(self.total.get('GPU', 0), 'GPU')}; "
                f"each task asks for {_count(self.cpus, 'CPU')} and {_count(self.gpus, 'GPU')}, tried up to "
                f"{_count(self.options.retries + 1, 'time')}")

    def _task(self, retries: int):
        return self._ray.remote(_run_unit).options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=retries,
                                                  retry_exceptions=True)

    def call(self, function: Callable, *args: Any) -> Any:
        """`function(*args)` as one task with the resources of the others, tried once: what a worker would
        answer (the device and dtype `auto` resolves to there, say). Its Olmo2KitError is raised here; any other
        exception as Ray raises it, with the worker's traceback."""
        outcome = self._ray.get(self._task(0).remote(function, *args))
        if outcome.error is not None:
            raise Olmo2KitError(outcome.error)
        return outcome.value

    def map(self, function: Callable, units: dict[Any, tuple], in_flight: int | None = None) -> Iterator[UnitDone]:
        """Run `function(*args)` as one Ray task per unit ({key: args}) and yield each as it finishes, in the
        order they finish. A unit that raises an exception or loses its worker is tried again, up to
        `retries` times; one that raises an Olmo2KitError is not (the same input fails the same way). `function`
        (a function or a callable object) is sent to the workers, so what it needs must be importable there.

        At most `in_flight` units are submitted at a time (default: twice as many as the cluster runs at once),
        so a job of thousands of units never holds all their arguments in Ray's object store; `function` is
        stored there once, not once a unit."""
        ray = self._ray
        task = self._task(self.options.retries)
        shared = ray.put(function)  # a top-level ObjectRef argument reaches the task as its value
        limit = max(1, in_flight or 2 * self.slots())
        waiting = iter(units.items())
        pending: dict = {}

        def submit() -> None:
            for key, args in waiting:
                pending[task.remote(shared, *args)] = key
                if len(pending) >= limit:
                    return

        submit()
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                key = pending.pop(ready[0])
                submit()
                try:
                    outcome = ray.get(ready[0])
                except ray.exceptions.RayError as e:
                    yield UnitDone(key, error=_failure(e))
                    continue
                yield UnitDone(key, outcome.value, outcome.error)
        finally:  # the caller stopped early (an interrupt, its own error): the units left are not wanted
            for ref in pending:
                ray.cancel(ref, force=True)  # a running unit's worker too: without force it may finish anyway

    def slots(self) -> int:
        """How many of these tasks the cluster runs at once, as each node's CPUs and GPUs allow (at least 1)."""
        asks = [(name, need) for name, need in (("CPU", self.cpus), ("GPU", self.gpus)) if need]
        return max(1, sum(int(min(node.get(name, 0) // need for name, need in asks)) for node in self.nodes))

    def close(self) -> None:
        """Stop the Ray this pool started (one it joined is left running)."""
        if self.started:
            self._ray.shutdown()
            self.started = False


def check_fits(nodes: list[dict[str, float]], cpus: float, gpus: float) -> None:
    """An Olmo2KitError unless one of `nodes` (each node's resources, as ray.nodes() gives them) holds a task
    of `cpus` CPUs and `gpus` GPUs."""
    largest = {name: max((node.get(name, 0) for node in nodes), default=0) for name in ("CPU", "GPU")}
    if gpus and not largest["GPU"]:
        raise Olmo2KitError(f"--ray-gpus {gpus:g}: the Ray cluster has 0 GPUs; "
                            "ask for fewer, or leave --ray-gpus out to run on CPUs where there is no GPU")
    for option, name, need in (("--ray-gpus", "GPU", gpus), ("--ray-cpus", "CPU", cpus)):
        if need > largest[name]:
            raise Olmo2KitError(f"{option} {need:g}: no node of the Ray cluster has {need:g} {name}s "
                                f"(the largest has {largest[name]:g}); ask for fewer")
    if not any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes):
        raise Olmo2KitError(f"--ray-cpus {cpus:g} with --ray-gpus {gpus:g}: no node of the Ray cluster has both "
                            "at once; ask for fewer")


@dataclass(frozen=True)
class _Outcome:
    value: Any = None
    error: str | None = None


def _run_unit(function: Callable, *args: Any) -> _Outcome:
    """The one Ray task (Ray's remote functions are plain functions, the unit may be a callable object). The
    user's mistake is returned, not raised: Ray tries again whatever a task raises."""
    try:
        return _Outcome(function(*args))
    except Olmo2KitError as e:
        return _Outcome(error=_first_line(e))


def _import_ray():
    try:
        import ray
    except ImportError:
        raise Olmo2KitError("--ray needs Ray: pip install 'olmo2kit[ray]'") from None
    return ray


def _connect(ray, options: RayOptions) -> None:
    address = options.address
    if address == LOCAL:
        # address="local" starts a Ray whatever RAY_ADDRESS or an earlier `ray start` (its
        # /tmp/ray/ray_current_cluster) say; without it ray.init joins those: ray/_private/worker.py, init.
        ray.init(address=LOCAL, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
        return
    if address == AUTO:
        # Where "auto" leads (RAY_ADDRESS, else the Ray `ray start` recorded), found as ray.init finds it, so that
        # a stale address fails in seconds too: ray/_private/services.py, canonicalize_bootstrap_address_or_die.
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            _check_head(canonicalize_bootstrap_address_or_die(AUTO), address)
        except ConnectionError as e:
            raise Olmo2KitError(f"--ray auto: no Ray is running here ({_first_line(e)}): start one with "
                                "`ray start --head`, set RAY_ADDRESS, or give --ray alone to start one") from None
    else:
        _check_head(address.removeprefix(CLIENT), address, client=address.startswith(CLIENT))
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise Olmo2KitError(f"--ray {address}: no Ray cluster there ({_first_line(e)}): start one with "
                            "`ray start --head`, or give --ray alone to start one here") from None


def _host_port(host_port: str, address: str) -> tuple[str, int]:
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        # No colon: a word right after a bare --ray (a prompt, say) is read as its address.
        hint = "" if ":" in address else "; to start a Ray here, write --ray local, or put --ray last"
        raise Olmo2KitError(f"--ray {_quoted(address)}: give local, auto, HOST:PORT or ray://HOST:PORT of a Ray "
                            f"head{hint}")
    return host, int(port)


# Seconds a head has to answer. Ray itself keeps trying for a minute or more (30 s for ray://, measured with
# Ray 2.60 on a closed port; over 100 s on a port where some other server answers), which a mistyped address
# should not cost.
CONNECT_TIMEOUT_S = 5


def _check_head(host_port: str, address: str, client: bool = False) -> None:
    """Fail in seconds where no Ray head answers: nothing listens there (refused at once), or a server that is
    not a head's GCS (or, with `client`, not a gRPC server such as Ray Client's) does."""
    import socket  # here: the CLI imports this module, and socket costs its start-up a few milliseconds

    try:
        socket.create_connection(_host_port(host_port, address), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise Olmo2KitError(f"--ray {address}: cannot reach a Ray head there ({e.strerror or e}): start one with "
                            "`ray start --head`, or give --ray alone to start one here") from None
    import grpc  # a dependency of Ray's
    from ray._private.grpc_utils import init_grpc_channel  # Ray's own channel: its TLS and token settings

    channel = init_grpc_channel(host_port)
    try:
        if client:  # Ray Client's server: any gRPC server is as far as one can tell without connecting
            grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
            return
        # The GCS answers this one call, with its cluster's id or, without the cluster's token, "unauthenticated":
        # either is a head (ray/core/generated/gcs_service_pb2_grpc.py; an empty request serializes to b"").
        channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")(b"", timeout=CONNECT_TIMEOUT_S,
                                                                         wait_for_ready=True)
    except grpc.FutureTimeoutError:
        raise Olmo2KitError(f"--ray {address}: no Ray Client answered there within {CONNECT_TIMEOUT_S} s: give "
                            "ray://HEAD:PORT of the head's Ray Client server (10001 by default)") from None
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            return
        why = ("a server answered, but not a Ray head's GCS" if e.code() == grpc.StatusCode.UNIMPLEMENTED
               else f"no Ray head answered there within {CONNECT_TIMEOUT_S} s")
        raise Olmo2KitError(f"--ray {address}: {why}: give the head's GCS port (6379 by default, as `ray start "
                            "--head` prints it), or ray://HEAD:PORT for its Ray Client server") from None
    finally:
        channel.close()


def _quoted(text: str) -> str:
    """`text` as a shell would need it: '' for an empty address."""
    import shlex

    return shlex.quote(text)


def _failure(error: Exception) -> str:
    """One line for a unit that failed for good: the worker's own exception where there is one."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {_first_line(cause)}"
    return f"{type(error).__name__}: {_first_line(error)}"


def _count(number: float, unit: str) -> str:
    return f"{number:g} {unit}" + ("" if number == 1 else "s")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
