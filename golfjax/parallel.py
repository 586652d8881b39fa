"""The device mesh, the shardings of data-parallel training, and multi-process runs.

One mesh axis, 'data': a rank of the reference is a device on it (global rank =
position on the data axis). Params and optimizer state are replicated; batches
are split along their sequence axis. Meshes use Auto axis types (jax 0.10's
`make_mesh` defaults to Explicit, which breaks embedding lookups with
batch-sharded ids).

Several processes (several hosts, or one process per GPU) run the same program
under `jax.distributed` (JAX's multi-controller runtime):

- `initialize_distributed(enabled)` must run before anything touches a jax
  backend. It reads the launcher's environment (explicit `JAX_*` variables,
  torchrun, SLURM, Open MPI), selects gloo collectives for CPU devices and
  connects to the coordination service hosted by process 0.
- The default mesh orders devices by process, so process p owns a contiguous
  block of ranks (`process_ranks`). Every process reads the same global chunk
  (as every rank of the reference does) and keeps the rows of its own ranks
  (`TokenLoader(..., local_ranks=process_ranks(mesh))`); `put_process_local`
  assembles the global batch with `jax.make_array_from_process_local_data`.
- Failure is bounded: a process that stops sending heartbeats for
  `heartbeat_timeout_seconds` (killed, out of memory, lost host) is declared
  dead by the coordination service, which then terminates every other process
  (XLA prints "Terminating process because the JAX distributed service detected
  fatal errors ... another task died"); if process 0 (the service) dies, the
  others terminate as soon as their next RPC fails. `fail_fast()` turns a
  Python failure in one process into exactly such a death, instead of a wait
  of up to `shutdown_timeout_seconds` at jax's exit barrier while the others
  sit in a collective.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Seconds; each can be overridden by the environment variable named beside it.
HEARTBEAT_TIMEOUT_S = 100  # GOLFJAX_HEARTBEAT_TIMEOUT: a silent process is dead after this long
INIT_TIMEOUT_S = 300  # GOLFJAX_INIT_TIMEOUT: how long to wait for every process to connect
SHUTDOWN_TIMEOUT_S = 300  # GOLFJAX_SHUTDOWN_TIMEOUT: how long a finished process waits for the others

# Exit status of a process that `fail_fast` ends after an exception.
EXIT_FAILED = 1


class DistributedError(RuntimeError):
    """A multi-process run that cannot start: no cluster environment, a bad variable, no peers."""


# ---------------------------------------------------------------------------- mesh and shardings


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: all devices, grouped by process).

    The default order (process index, then device id) gives process p a
    contiguous block of ranks; an explicit `devices` list is used as given.
    """
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def num_ranks(mesh: Mesh) -> int:
    return int(mesh.shape[DATA_AXIS])


def process_ranks(mesh: Mesh, process_index: int | None = None) -> tuple[int, ...]:
    """The ranks (positions on the data axis) of a process's devices, ascending (default: this process)."""
    p = jax.process_index() if process_index is None else process_index
    return tuple(r for r, d in enumerate(mesh.devices.reshape(-1)) if d.process_index == p)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sharded_along(mesh: Mesh, axis: int, ndim: int) -> NamedSharding:
    """Split dimension `axis` of an `ndim`-array over the data axis."""
    spec = [None] * ndim
    spec[axis] = DATA_AXIS
    return NamedSharding(mesh, P(*spec))


def put_replicated(tree, mesh: Mesh):
    """Replicate a host tree (identical on every process) over the mesh."""
    return jax.device_put(tree, replicated(mesh))


def put_sharded(array: np.ndarray, mesh: Mesh, axis: int) -> jax.Array:
    """Place a global host array with dimension `axis` split over the mesh.

    Every process holds the whole global array; each device receives its slice,
    so the same call works with one process or several.
    """
    sharding = sharded_along(mesh, axis, array.ndim)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_process_local(local: np.ndarray, mesh: Mesh, axis: int) -> jax.Array:
    """The global array whose dimension `axis` is split over the mesh, from this process's rows.

    `local` holds, along `axis`, the equal slices of this process's ranks
    (`process_ranks(mesh)`) in ascending rank order, e.g. `TokenLoader.next_batch()`
    with `local_ranks=process_ranks(mesh)`; each local device receives its own
    rank's slice. With one process `local` is the whole global array.
    """
    ranks = num_ranks(mesh)
    mine = len(process_ranks(mesh))
    if mine == 0 or local.shape[axis] % mine:
        raise ValueError(
            f"put_process_local: dimension {axis} of the local array ({local.shape[axis]}) must split "
            f"evenly over this process's {mine} rank(s)"
        )
    global_shape = list(local.shape)
    global_shape[axis] = local.shape[axis] // mine * ranks
    sharding = sharded_along(mesh, axis, local.ndim)
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def to_host(array: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process, sharded) array as numpy, on every process.

    `np.asarray` needs every shard on this process; an array split over several
    processes is gathered first (a collective: every process must call this).
    """
    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


# ---------------------------------------------------------------------------- multi-process runs


@dataclass(frozen=True)
class ClusterSpec:
    """How this process joins a multi-process run. `None` fields are left to jax's own detection."""

    source: str  # which environment described the run
    num_processes: int
    process_id: int
    coordinator_address: str | None = None
    # None: every local device; otherwise the local devices (GPUs) this process drives.
    local_device_ids: tuple[int, ...] | None = None
    # Name of jax's cluster detector that fills the coordinator address (slurm, ompi).
    jax_detection: str | None = None


def _int_var(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def _tasks_on_this_node(tasks_per_node: str, node_id: int) -> int | None:
    """SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE ('2(x3),1') for node `node_id`."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        n, _, rep = part.partition("(x")
        try:
            counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
        except ValueError:
            return None
    return counts[node_id] if 0 <= node_id < len(counts) else None


def _local_devices(local_size: int | None, local_rank: int) -> tuple[int, ...] | None:
    """One process per host drives all its devices; several split them one device each."""
    return None if local_size is None or local_size <= 1 else (local_rank,)


def detect_cluster(env: Mapping[str, str] | None = None) -> ClusterSpec | None:
    """The multi-process run described by the environment, or None if there is none.

    Checked in this order:
    1. JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID
       (optionally JAX_LOCAL_DEVICE_IDS, read by jax itself);
    2. torchrun: MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK (LOCAL_RANK,
       LOCAL_WORLD_SIZE). torchrun keeps its own store on MASTER_PORT, so the
       JAX coordinator listens on MASTER_PORT + 1 (or JAX_COORDINATOR_PORT);
    3. SLURM (srun): SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS,
       SLURM_PROCID, SLURM_LOCALID; jax derives the coordinator (first node,
       port from the job id or JAX_COORDINATOR_PORT);
    4. Open MPI (mpirun): OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE/RANK/LOCAL_RANK.
    With several processes on one host each drives one device (its local
    rank); with one process per host it drives all of them.
    """
    env = os.environ if env is None else env
    jax_vars = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    if any(v in env for v in jax_vars[1:]):
        missing = [v for v in jax_vars if v not in env]
        if missing:
            raise DistributedError(
                f"incomplete multi-process environment: {', '.join(missing)} not set "
                f"(set all of {', '.join(jax_vars)})"
            )
        return ClusterSpec("JAX_* environment", _int_var(env, "JAX_NUM_PROCESSES"),
                           _int_var(env, "JAX_PROCESS_ID"), env["JAX_COORDINATOR_ADDRESS"])
    torch_vars = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
    if all(v in env for v in torch_vars):
        if "JAX_COORDINATOR_PORT" in env:
            port = _int_var(env, "JAX_COORDINATOR_PORT")
        else:
            port = _int_var(env, "MASTER_PORT") + 1
        local_size = _int_var(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else None
        local_rank = _int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        return ClusterSpec("torchrun", _int_var(env, "WORLD_SIZE"), _int_var(env, "RANK"),
                           f"{env['MASTER_ADDR']}:{port}", _local_devices(local_size, local_rank))
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm_vars):
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        node_id = _int_var(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
        local_size = _tasks_on_this_node(per_node, node_id) if per_node else None
        return ClusterSpec("SLURM", _int_var(env, "SLURM_NTASKS"), _int_var(env, "SLURM_PROCID"),
                           local_device_ids=_local_devices(local_size, _int_var(env, "SLURM_LOCALID")),
                           jax_detection="slurm")
    if "OMPI_MCA_orte_hnp_uri" in env:
        ompi_vars = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")
        missing = [v for v in ompi_vars if v not in env]
        if missing:
            raise DistributedError(f"Open MPI environment without {', '.join(missing)}")
        local_size = _int_var(env, "OMPI_COMM_WORLD_LOCAL_SIZE") if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else None
        return ClusterSpec("Open MPI", _int_var(env, "OMPI_COMM_WORLD_SIZE"), _int_var(env, "OMPI_COMM_WORLD_RANK"),
                           local_device_ids=_local_devices(local_size, _int_var(env, "OMPI_COMM_WORLD_LOCAL_RANK")),
                           jax_detection="ompi")
    return None


def _timeout(env: Mapping[str, str], name: str, given: int | None, default: int) -> int:
    if given is not None:
        value = given
    elif name in env:
        value = _int_var(env, name)
    else:
        value = default
    if value <= 0:
        raise DistributedError(f"{name}={value}: timeouts must be positive seconds")
    return value


@dataclass(frozen=True)
class DistributedInfo:
    spec: ClusterSpec
    heartbeat_timeout_s: int
    init_timeout_s: int
    shutdown_timeout_s: int

    def describe(self) -> str:
        s = self.spec
        where = s.coordinator_address or f"from {s.jax_detection}"
        return (f"distributed:process {s.process_id}/{s.num_processes} source:{s.source} coordinator:{where} "
                f"heartbeat_timeout:{self.heartbeat_timeout_s}s")


_info: DistributedInfo | None = None


def initialize_distributed(
    enabled: bool | None = None,
    *,
    heartbeat_timeout_seconds: int | None = None,
    initialization_timeout_seconds: int | None = None,
    shutdown_timeout_seconds: int | None = None,
    env: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> DistributedInfo | None:
    """Join a multi-process run; call before any other jax use. Returns None for a single process.

    enabled=True (`--distributed`): the environment must describe a run
    (`detect_cluster`), else DistributedError. enabled=None (auto): initialise
    only when the environment describes a run of more than one process.
    enabled=False: never. Timeouts default to the GOLFJAX_HEARTBEAT_TIMEOUT,
    GOLFJAX_INIT_TIMEOUT and GOLFJAX_SHUTDOWN_TIMEOUT environment variables,
    then to 100, 300 and 300 s. Calling it again returns the first result.

    Before connecting it logs one line (default: stderr) naming the process, the
    coordinator and the wait: a process whose peers never arrive is terminated by
    XLA after the init timeout with "DEADLINE_EXCEEDED ... RegisterTask", and this
    line says what it was waiting for.
    """
    global _info
    if _info is not None or enabled is False:
        return _info
    env = os.environ if env is None else env
    spec = detect_cluster(env)
    if spec is None:
        if enabled:
            raise DistributedError(
                "--distributed: no multi-process environment found; set JAX_COORDINATOR_ADDRESS=host:port, "
                "JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i on every process, or launch with torchrun, srun "
                "(SLURM) or mpirun (Open MPI)"
            )
        return None
    if spec.num_processes < 1 or not 0 <= spec.process_id < spec.num_processes:
        raise DistributedError(
            f"{spec.source}: process id {spec.process_id} is not in [0, {spec.num_processes})"
        )
    if spec.num_processes == 1 and not enabled:
        return None
    info = DistributedInfo(
        spec,
        _timeout(env, "GOLFJAX_HEARTBEAT_TIMEOUT", heartbeat_timeout_seconds, HEARTBEAT_TIMEOUT_S),
        _timeout(env, "GOLFJAX_INIT_TIMEOUT", initialization_timeout_seconds, INIT_TIMEOUT_S),
        _timeout(env, "GOLFJAX_SHUTDOWN_TIMEOUT", shutdown_timeout_seconds, SHUTDOWN_TIMEOUT_S),
    )
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise DistributedError(
            "initialize_distributed must run before any jax computation or device query "
            "(jax.devices(), device_put, jit): call it first thing in main"
        )
    # CPU devices need a cross-process collective library (gloo, unless the user chose
    # MPI); GPUs and TPUs ignore the setting.
    if jax.config.jax_cpu_collectives_implementation != "mpi":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if spec.local_device_ids is not None:
        local_ids: list[int] | None = list(spec.local_device_ids)
    elif spec.jax_detection:
        # jax's SLURM/Open MPI detection would restrict each process to the one GPU
        # of its local rank; an empty list keeps every local device visible.
        local_ids = []
    else:
        local_ids = None
    (log or _stderr_line)(
        f"distributed: process {spec.process_id} of {spec.num_processes} ({spec.source}) joining the coordinator "
        f"at {spec.coordinator_address or 'the address ' + str(spec.jax_detection) + ' detection gives'}; "
        f"waiting up to {info.init_timeout_s} s for all processes (GOLFJAX_INIT_TIMEOUT)"
    )
    try:
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            local_device_ids=local_ids,
            # Only the detector named by the spec: a torchrun job inside a SLURM
            # allocation must not pick up SLURM's process layout.
            cluster_detection_method=spec.jax_detection or "deactivate",
            initialization_timeout=info.init_timeout_s,
            heartbeat_timeout_seconds=info.heartbeat_timeout_s,
            shutdown_timeout_seconds=info.shutdown_timeout_s,
        )
    except Exception as exc:  # XlaRuntimeError (deadline exceeded, address in use), ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(
            f"process {spec.process_id} of {spec.num_processes} ({spec.source}) could not join the run at "
            f"{spec.coordinator_address or 'the detected coordinator'}: {first}. Check that every process "
            "gets the same coordinator address and process count"
        ) from exc
    _info = info
    return info


def _stderr_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def distributed_info() -> DistributedInfo | None:
    """What `initialize_distributed` set up, or None in a single-process run."""
    return _info


def is_coordinator() -> bool:
    """True on process 0: the one process that logs and writes files (checkpoints, artifacts)."""
    return jax.process_index() == 0


def _multi_process() -> bool:
    return _info is not None and _info.spec.num_processes > 1


@contextlib.contextmanager
def fail_fast(stream=None) -> Iterator[None]:
    """In a multi-process run, end this process at once if the block fails.

    An exception (or sys.exit with a non-zero status) escaping the block would
    otherwise run jax's exit handler, which waits at a shutdown barrier for up to
    the shutdown timeout while the other processes wait for this one in a
    collective. Instead this prints the error and leaves with os._exit, so the
    others see its heartbeats stop and exit within the heartbeat timeout.
    In a single-process run, or when the block succeeds, it does nothing.
    """
    try:
        yield
    except SystemExit as exc:
        if _multi_process() and exc.code in (None, 0):
            _leave_together()
        if _multi_process() and exc.code not in (None, 0):
            if isinstance(exc.code, str):  # sys.exit("message"), which Python would print
                print(exc.code, file=stream or sys.stderr)
            _exit_now(exc.code if isinstance(exc.code, int) else EXIT_FAILED, None, stream)
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must end the process
        if _multi_process():
            _exit_now(130 if isinstance(exc, KeyboardInterrupt) else EXIT_FAILED, exc, stream)
        raise
    else:
        if _multi_process():
            _leave_together()


def _leave_together() -> None:
    """After a successful multi-process run: meet the others, then exit without jax's teardown.

    The coordinator's gRPC service can abort (SIGABRT) while being destroyed with
    requests of other processes still in flight; so every process waits at a
    barrier, the others leave at once, and process 0 (which hosts the service)
    leaves a moment later, once nobody talks to it any more.
    """
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("golfjax:leave")
    sys.stdout.flush()
    sys.stderr.flush()
    if _info is not None and _info.spec.process_id == 0:
        time.sleep(1.0)
    os._exit(0)


def _exit_now(code: int, exc: BaseException | None, stream) -> None:
    stream = stream or sys.stderr
    assert _info is not None
    s = _info.spec
    try:
        hint = ""
        if exc is not None:
            traceback.print_exception(exc, file=stream)
            if isinstance(exc, jax.errors.JaxRuntimeError) and any(
                    k in str(exc) for k in ("Gloo", "NCCL", "peer", "coordination service")):
                hint = " in a collective: another process probably died first (see its log)"
        print(f"error: process {s.process_id} of {s.num_processes} failed{hint} (exit status {code}); leaving "
              f"without the shutdown barrier, the other processes stop within {_info.heartbeat_timeout_s} s",
              file=stream)
        sys.stdout.flush()
        stream.flush()
    finally:
        os._exit(code)
