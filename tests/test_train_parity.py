"""Training parity with the reference: 5 steps from init_state.npz, and data parallelism.

The golden run uses the reference's optimizer split, schedule and momentum
warmup, world size 1 and 8 accumulation steps of one 64-token sequence.
"""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from golfjax import interop
from golfjax.optim.build import build_optimizer, lr_multiplier
from golfjax.parallel import make_mesh, put_replicated
from golfjax.train.step import init_state, make_train_step
from tests.test_golden_parity import golden_config, golden_json, load_params


def run_steps(cfg, params, batches, devices):
    mesh = make_mesh(jax.devices()[:devices])
    tx = build_optimizer(params, cfg.optim, cfg.model.tie_embeddings)
    step_fn = make_train_step(cfg, mesh, tx)
    state = put_replicated(init_state(cfg, params, tx), mesh)
    losses = []
    t = cfg.train
    for step, (x, y) in enumerate(batches):
        lr_mul = lr_multiplier(step, 0.0, t.iterations, t.warmdown_iters, t.max_wallclock_seconds)
        state, metrics = step_fn(state, x, y, jnp.float32(lr_mul))
        losses.append((float(metrics["train_loss"]), np.asarray(metrics["micro_losses"])))
    return state, losses


def test_five_steps_match_the_reference(golden_dir):
    cfg = golden_config()
    gj = golden_json(golden_dir)
    batches = np.load(golden_dir / "batches.npz")
    xs, ys = batches["x"].astype(np.int32), batches["y"].astype(np.int32)  # (steps, accum, seqs, seq_len)
    state, losses = run_steps(cfg, load_params(golden_dir / "init_state.npz"), zip(xs, ys), devices=1)
    for (loss, micro), ref in zip(losses, gj["steps"]):
        assert abs(loss - ref["train_loss"]) <= 1e-5
        np.testing.assert_allclose(micro, ref["micro_losses"], atol=1e-5, rtol=0)
    ours = interop.to_reference_state(state.params)
    init = interop.load_reference_state(golden_dir / "init_state.npz")
    ref_state = interop.load_reference_state(golden_dir / "final_state.npz")
    for name, ref in ref_state.items():
        diff = ours[name] - ref
        rel = np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-12)
        assert np.abs(diff).max() <= 1e-3, name
        if not np.any(init[name]) and name.endswith("proj.weight"):
            # Zero-initialised Muon matrices consist only of bf16 Newton-Schulz outputs, and bf16 NS
            # is chaotic: our gradients are ~5e-7 (relative) off the reference's, which flips a few
            # roundings of bf16(G/|G|), and five bf16 steps spread each flip to ~2% of the output.
            # Not an eager-vs-compiled issue: torch's own eager NS on our gradients gives the same
            # 0.7-1.2% as ours, its torch.compile'd NS (= rounding="compiled") 2.1-2.4%, and with the
            # reference's exact step-1 gradients the golden step-1 update is the eager one. Every
            # other tensor meets 1e-4.
            assert rel <= 2e-2, (name, rel)
        else:
            assert rel <= 1e-4, (name, rel)


def test_eight_devices_equal_one_device_with_accumulation(golden_dir):
    """Same global batch: 8 ranks x 1 micro-batch vs 1 rank x 8 micro-batches.

    Newton-Schulz runs in float32 here: in bf16 a last-bit difference of a gradient
    can flip one bf16 rounding of the update, which hides nothing about parallelism.
    """
    cfg = golden_config()
    cfg = replace(cfg, optim=replace(cfg.optim, muon_ns_dtype="float32"))
    batches = np.load(golden_dir / "trained" / "batches.npz")
    xs, ys = batches["x"][:3].astype(np.int32), batches["y"][:3].astype(np.int32)
    params = load_params(golden_dir / "trained" / "final_state.npz")  # non-trivial attention and MLP
    one, losses_one = run_steps(cfg, params, zip(xs, ys), devices=1)
    # With 8 ranks and no accumulation the reference's loader yields the same spans as one
    # (1, 8, 64) micro-batch whose row r is rank r's sequence.
    eight, losses_eight = run_steps(cfg, params, zip(xs.reshape(3, 1, 8, 64), ys.reshape(3, 1, 8, 64)), devices=8)
    for (a, _), (b, _) in zip(losses_one, losses_eight):
        assert abs(a - b) <= 2e-6
    for name, p1 in interop.to_reference_state(one.params).items():
        p8 = interop.to_reference_state(eight.params)[name]
        np.testing.assert_allclose(p8, p1, rtol=2e-5, atol=2e-6, err_msg=name)
