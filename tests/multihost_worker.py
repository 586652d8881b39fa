"""One process of the two-process tests in test_multihost.py (also imported there for the
one-process reference, so both run the same training code).

    python tests/multihost_worker.py --data DIR --out DIR --local-devices 4 [--steps N | --forever | --spin]
        [--raise-at STEP --raise-process P]

The process joins the run from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID (as a launcher would set them), trains a tiny model on the
shards in DIR, checks that every local device holds its own rank's rows of the
reference's global batch, and writes `out/process<i>.npz` (losses, params,
evaluation NLLs). `--forever` trains until killed, `--spin` runs cheap
collectives until killed (both touch `out/ready<i>` after their first step);
`--raise-at` makes process P raise at that step.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 32
RANKS = 8
GRAD_ACCUM = 2
SEQS_PER_RANK = 2
GLOBAL_TOKENS = RANKS * GRAD_ACCUM * SEQS_PER_RANK * SEQ_LEN
ITERATIONS, WARMDOWN = 3, 2  # the LR multiplier changes during the test's 3 steps
EVAL_SEQS = 16


def tiny_config():
    from golfjax.config import Config, ModelConfig, OptimConfig, TrainConfig

    model = ModelConfig(vocab_size=1024, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2,
                        compute_dtype="float32")
    train = TrainConfig(iterations=ITERATIONS, warmdown_iters=WARMDOWN, train_seq_len=SEQ_LEN,
                        train_batch_tokens=GLOBAL_TOKENS, grad_accum_steps=GRAD_ACCUM, max_wallclock_seconds=0.0)
    return replace(Config(), model=model, train=train, optim=OptimConfig(muon_ns_dtype="float32"))


def write_data(directory: Path, seed: int = 0) -> None:
    """Two random train shards (the stream crosses from one to the other) and validation tokens."""
    from golfjax.data.shards import write_shard

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        write_shard(directory / f"train_{i:06d}.bin", rng.integers(0, 1024, 3000, dtype=np.uint16))
    write_shard(directory / "val_000000.bin", rng.integers(0, 1024, EVAL_SEQS * SEQ_LEN + 1, dtype=np.uint16))


def flat_params(params) -> dict[str, np.ndarray]:
    import jax

    from golfjax.parallel import to_host

    return {jax.tree_util.keystr(path): to_host(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def train(data: Path, mesh, steps: int | None, process_local: bool, after_step=None) -> dict[str, np.ndarray]:
    """Train `steps` steps (None: forever) on `mesh`; returns losses, params and eval NLLs.

    process_local: each process loads only its ranks' rows (`local_ranks`) and the batch is
    assembled with put_process_local; otherwise the whole global batch goes through put_sharded.
    """
    import jax
    import jax.numpy as jnp

    from golfjax.data.loader import TokenLoader
    from golfjax.data.shards import read_shard
    from golfjax.eval.plain import make_token_nll
    from golfjax.model import gpt
    from golfjax.optim.build import build_optimizer, lr_multiplier
    from golfjax.parallel import (num_ranks, process_ranks, put_process_local, put_replicated, put_sharded,
                                  to_host)
    from golfjax.train.step import init_state, make_train_step

    cfg = tiny_config()
    t = cfg.train
    assert num_ranks(mesh) == RANKS
    files = sorted(data.glob("train_*.bin"))
    local_ranks = process_ranks(mesh) if process_local else None
    loader = TokenLoader(files, t.train_batch_tokens, SEQ_LEN, RANKS, GRAD_ACCUM, local_ranks=local_ranks)
    reference = TokenLoader(files, t.train_batch_tokens, SEQ_LEN, RANKS, GRAD_ACCUM)  # the whole global batch

    params = gpt.init_params(cfg.model, jax.random.PRNGKey(t.seed))
    tx = build_optimizer(params, cfg.optim, cfg.model.tie_embeddings)
    step_fn = make_train_step(cfg, mesh, tx)
    state = put_replicated(init_state(cfg, params, tx), mesh)
    mesh_devices = list(mesh.devices.reshape(-1))
    rows = SEQS_PER_RANK

    losses, micro_losses, lr_muls = [], [], []
    step = 0
    while steps is None or step < steps:
        x, y = loader.next_batch()
        gx, gy = reference.next_batch()
        if process_local:
            xa, ya = put_process_local(x, mesh, 1), put_process_local(y, mesh, 1)
        else:
            xa, ya = put_sharded(x, mesh, 1), put_sharded(y, mesh, 1)
        for arr, ref in ((xa, gx), (ya, gy)):
            assert arr.shape == ref.shape, (arr.shape, ref.shape)
            for shard in arr.addressable_shards:  # the device of rank r holds rank r's span
                r = mesh_devices.index(shard.device)
                assert shard.index[1] == slice(r * rows, (r + 1) * rows), (r, shard.index)
                np.testing.assert_array_equal(np.asarray(shard.data), ref[:, r * rows:(r + 1) * rows])
        lr_mul = lr_multiplier(step % ITERATIONS, 0.0, t.iterations, t.warmdown_iters, 0.0)
        state, metrics = step_fn(state, xa, ya, jnp.float32(lr_mul))
        losses.append(float(metrics["train_loss"]))
        micro_losses.append(to_host(metrics["micro_losses"]))
        lr_muls.append(lr_mul)
        step += 1
        if after_step is not None:
            after_step(step)
    assert loader.state() == reference.state()

    # Evaluation NLLs: the batch split over both processes, gathered back on every process.
    val = np.asarray(read_shard(next(data.glob("val_*.bin"))), dtype=np.int32)
    vx, vy = val[:-1].reshape(EVAL_SEQS, SEQ_LEN), val[1:].reshape(EVAL_SEQS, SEQ_LEN)
    nll = to_host(make_token_nll(cfg.model, mesh)(state.params, put_sharded(vx, mesh, 0), put_sharded(vy, mesh, 0)))

    out = {"losses": np.asarray(losses), "micro_losses": np.stack(micro_losses), "lr_muls": np.asarray(lr_muls),
           "eval_nll": nll, "local_ranks": np.asarray(process_ranks(mesh))}
    out.update({"param" + k: v for k, v in flat_params(state.params).items()})
    return out


def spin(mesh, after_step) -> None:
    """Cheap collectives forever (for the failure tests): a global sum of a batch split over both processes."""
    import jax
    import jax.numpy as jnp

    from golfjax.parallel import process_ranks, put_process_local, replicated

    total = jax.jit(jnp.sum, out_shardings=replicated(mesh))
    local = np.ones((1, len(process_ranks(mesh)) * SEQS_PER_RANK, SEQ_LEN), np.int32)
    step = 0
    while True:
        assert int(total(put_process_local(local, mesh, 1))) == RANKS * SEQS_PER_RANK * SEQ_LEN
        step += 1
        after_step(step)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local-devices", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--forever", action="store_true", help="train until killed")
    parser.add_argument("--spin", action="store_true", help="run cheap collectives (not training) until killed")
    parser.add_argument("--raise-at", type=int, default=-1)
    parser.add_argument("--raise-process", type=int, default=1)
    args = parser.parse_args()
    # Before jax is imported: this process's CPU devices (replacing any inherited count).
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.local_devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(REPO))

    from golfjax.parallel import fail_fast, initialize_distributed

    with fail_fast():
        info = initialize_distributed(True)
        print(info.describe(), flush=True)
        import jax

        from golfjax.parallel import make_mesh

        pid = jax.process_index()
        assert jax.process_count() == info.spec.num_processes and jax.device_count() == RANKS

        def after_step(step: int) -> None:
            if step == 1:
                (args.out / f"ready{pid}").touch()
            if step == args.raise_at and pid == args.raise_process:
                raise RuntimeError(f"injected failure in process {pid} at step {step}")

        if args.spin:
            spin(make_mesh(), after_step)
        results = train(args.data, make_mesh(), None if args.forever else args.steps, True, after_step)
        np.savez(args.out / f"process{pid}.npz", **results)
        print(f"process {pid}: losses {results['losses'].tolist()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
