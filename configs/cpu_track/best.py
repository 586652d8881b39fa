"""The CPU golf track's best stack: the best golfjax can field at this scale.

It grows as techniques land (record-stack issues: new model, optimizer,
export and evaluation fields) and as ablations on the track show a setting
helps (scripts/ablate.py, 3 seeds, p < 0.01). Today it is exactly
configs/cpu_track/baseline.py: no setting that already exists in
golfjax.config has been measured to help on the track yet. Checked and not
taken: train.grad_accum_steps=1 (same math as the reference's 8 micro-batches,
but measured slower on 2 CPU cores: 3.26 s vs 2.61 s median per step,
interleaved in one process). Candidates from the leaderboard records, to be
ablated on the track before they move here (docs/CPU_TRACK.md has the
commands): optim.grad_clip_norm=0.3; lower LRs (optim.matrix_lr=0.02-0.026,
optim.tied_embed_lr=0.03, optim.scalar_lr=0.02); Muon momentum 0.97 warmed up
from 0.92; a longer warmdown (train.warmdown_iters, counted in iterations
but applied over the wall-clock, so its best value depends on the machine).

    python scripts/train.py --config configs/cpu_track/best.py --set train.seed=1
"""

from pathlib import Path

from golfjax.config import Config, load_config_file


def get_config() -> Config:
    c = load_config_file(Path(__file__).with_name("baseline.py"))
    # Changes to the baseline go here, each with its ablation result (docs/CPU_TRACK.md).
    return c
