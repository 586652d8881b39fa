"""golfjax.parallel in one process: cluster detection, the distributed switch, mesh order,
process-local batch assembly, and the loader's local_ranks option.

The two-process runs themselves are in test_multihost.py.
"""

from __future__ import annotations

import io

import jax
import numpy as np
import pytest

from golfjax import parallel
from golfjax.data.loader import LoaderError, TokenLoader
from golfjax.data.shards import write_shard
from golfjax.parallel import (
    ClusterSpec,
    DistributedError,
    detect_cluster,
    fail_fast,
    initialize_distributed,
    make_mesh,
    process_ranks,
    put_process_local,
    put_sharded,
    to_host,
)

# ---------------------------------------------------------------------------- cluster detection

JAX_ENV = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
TORCHRUN = {"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500", "WORLD_SIZE": "16", "RANK": "9",
            "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}
SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_NTASKS": "4",
         "SLURM_PROCID": "3", "SLURM_LOCALID": "0", "SLURM_NODEID": "3", "SLURM_STEP_TASKS_PER_NODE": "1(x4)"}
OMPI = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911", "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}


def test_no_cluster_environment():
    assert detect_cluster({}) is None
    assert detect_cluster({"PATH": "/bin", "RANK": "0"}) is None  # a lone RANK is not torchrun


def test_explicit_jax_variables():
    assert detect_cluster(JAX_ENV) == ClusterSpec("JAX_* environment", 4, 2, "10.0.0.1:1234")


def test_explicit_jax_variables_must_be_complete():
    with pytest.raises(DistributedError, match="JAX_COORDINATOR_ADDRESS not set"):
        detect_cluster({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
    with pytest.raises(DistributedError, match="JAX_PROCESS_ID='one' is not an integer"):
        detect_cluster(dict(JAX_ENV, JAX_PROCESS_ID="one"))


def test_torchrun_one_device_per_process_and_the_port_beside_its_store():
    spec = detect_cluster(TORCHRUN)
    assert spec == ClusterSpec("torchrun", 16, 9, "10.0.0.7:29501", (1,))
    assert detect_cluster(dict(TORCHRUN, JAX_COORDINATOR_PORT="4000")).coordinator_address == "10.0.0.7:4000"
    # one process per host drives all of the host's devices
    assert detect_cluster(dict(TORCHRUN, LOCAL_WORLD_SIZE="1")).local_device_ids is None


def test_slurm_leaves_the_address_to_jax_and_keeps_all_devices_with_one_task_per_node():
    spec = detect_cluster(SLURM)
    assert spec == ClusterSpec("SLURM", 4, 3, None, None, "slurm")
    two_per_node = detect_cluster(dict(SLURM, SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURM_NODEID="1",
                                       SLURM_LOCALID="1"))
    assert two_per_node.local_device_ids == (1,)
    mixed = dict(SLURM, SLURM_STEP_TASKS_PER_NODE="2,1(x2)", SLURM_NODEID="2")
    assert detect_cluster(mixed).local_device_ids is None
    assert parallel._tasks_on_this_node("2,1(x2)", 0) == 2
    assert parallel._tasks_on_this_node("garbage(x", 0) is None


def test_open_mpi():
    assert detect_cluster(OMPI) == ClusterSpec("Open MPI", 8, 5, None, (1,), "ompi")
    with pytest.raises(DistributedError, match="OMPI_COMM_WORLD_RANK"):
        detect_cluster({k: v for k, v in OMPI.items() if k != "OMPI_COMM_WORLD_RANK"})


def test_explicit_variables_win_over_launchers():
    assert detect_cluster({**SLURM, **TORCHRUN, **JAX_ENV}).source == "JAX_* environment"
    assert detect_cluster({**SLURM, **TORCHRUN}).source == "torchrun"


# ---------------------------------------------------------------------------- the switch


def test_disabled_or_single_process_does_not_initialise():
    assert initialize_distributed(False, env=JAX_ENV) is None
    assert initialize_distributed(None, env={}) is None
    assert initialize_distributed(None, env=dict(TORCHRUN, WORLD_SIZE="1", RANK="0")) is None
    assert parallel.distributed_info() is None
    assert not jax.distributed.is_initialized()


def test_distributed_flag_without_an_environment_says_what_to_set():
    with pytest.raises(DistributedError, match="set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N"):
        initialize_distributed(True, env={})


def test_bad_process_id_and_timeouts():
    with pytest.raises(DistributedError, match=r"process id 4 is not in \[0, 4\)"):
        initialize_distributed(None, env=dict(JAX_ENV, JAX_PROCESS_ID="4"))
    with pytest.raises(DistributedError, match="GOLFJAX_HEARTBEAT_TIMEOUT=0"):
        initialize_distributed(None, env=dict(JAX_ENV, GOLFJAX_HEARTBEAT_TIMEOUT="0"))


def test_too_late_after_jax_started():
    jax.devices()  # the backend of this test process is up
    with pytest.raises(DistributedError, match="before any jax computation"):
        initialize_distributed(None, env=JAX_ENV)
    assert not jax.distributed.is_initialized()


def test_fail_fast_does_nothing_in_one_process():
    with pytest.raises(ValueError, match="boom"):
        with fail_fast(io.StringIO()):
            raise ValueError("boom")
    with pytest.raises(SystemExit):
        with fail_fast(io.StringIO()):
            raise SystemExit(2)
    with fail_fast(io.StringIO()):
        pass


def test_is_coordinator_in_one_process():
    assert parallel.is_coordinator()


# ---------------------------------------------------------------------------- mesh and batches


def test_default_mesh_groups_devices_by_process():
    mesh = make_mesh()
    devices = list(mesh.devices)
    assert devices == sorted(devices, key=lambda d: (d.process_index, d.id))
    assert process_ranks(mesh) == tuple(range(len(devices)))
    assert process_ranks(mesh, process_index=1) == ()


def test_put_process_local_in_one_process_is_put_sharded():
    mesh = make_mesh(jax.devices()[:8])
    x = np.arange(2 * 16 * 3, dtype=np.int32).reshape(2, 16, 3)
    a, b = put_process_local(x, mesh, 1), put_sharded(x, mesh, 1)
    assert a.sharding == b.sharding
    for sa, sb in zip(a.addressable_shards, b.addressable_shards):
        assert sa.device == sb.device and sa.index == sb.index
        np.testing.assert_array_equal(np.asarray(sa.data), np.asarray(sb.data))
    np.testing.assert_array_equal(to_host(a), x)
    with pytest.raises(ValueError, match="must split evenly over this process's 8 rank"):
        put_process_local(x[:, :12], mesh, 1)


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(3)
    files = []
    for i, n in enumerate([700, 450, 900]):
        files.append(tmp_path / f"train_{i}.bin")
        write_shard(files[-1], rng.integers(0, 1024, n, dtype=np.uint16))
    return files


@pytest.mark.parametrize("groups", [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 1], [2, 3], [4, 5], [6, 7]],
                                    [[1, 5], [0, 2, 3, 4, 6, 7]]])
def test_local_ranks_split_the_global_batch(shards, groups):
    """Each process's rows are its ranks' spans; together they are the global batch, and
    every process's stream stays at the same position."""
    kw = dict(global_tokens=8 * 2 * 3 * 16, seq_len=16, ranks=8, grad_accum_steps=2)
    whole = TokenLoader(shards, **kw)
    parts = [TokenLoader(shards, local_ranks=g, **kw) for g in groups]
    for _ in range(4):  # crosses shard ends
        gx, gy = whole.next_batch()
        assert gx.shape == whole.batch_shape
        for loader, ranks in zip(parts, groups):
            x, y = loader.next_batch()
            assert x.shape == loader.local_batch_shape == (2, 3 * len(ranks), 16)
            assert loader.batch_shape == whole.batch_shape
            for j, r in enumerate(sorted(ranks)):
                np.testing.assert_array_equal(x[:, 3 * j:3 * j + 3], gx[:, 3 * r:3 * r + 3])
                np.testing.assert_array_equal(y[:, 3 * j:3 * j + 3], gy[:, 3 * r:3 * r + 3])
            assert loader.state() == whole.state()


def test_local_ranks_default_is_every_rank(shards):
    kw = dict(global_tokens=4 * 2 * 16, seq_len=16, ranks=4, grad_accum_steps=2)
    a, b = TokenLoader(shards, **kw), TokenLoader(shards, local_ranks=[3, 0, 2, 1], **kw)
    assert a.local_ranks == b.local_ranks == (0, 1, 2, 3)
    for u, v in zip(a.next_batch(), b.next_batch()):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("bad", [[], [0, 0], [8], [-1, 2]])
def test_bad_local_ranks(shards, bad):
    with pytest.raises(LoaderError, match="must be distinct ranks in"):
        TokenLoader(shards, 8 * 2 * 16, 16, 8, 2, local_ranks=bad)
