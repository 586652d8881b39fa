"""Ablate a config: train each variant with each seed, compare every variant to the control.

    python scripts/ablate.py --config configs/cpu_track/baseline.py --toggle train.warmdown_iters=1200,3000 --seeds 3
    python scripts/ablate.py --config configs/cpu_track/baseline.py \
        --toggle model.num_layers=2,3 --toggle optim.matrix_lr=0.04,0.06 --mode grid --seeds 1,2,3 \
        --set train.max_wallclock_seconds=120 --out runs/ablate-depth-lr

A toggle's first value is the control. Runs go to OUT/<variant>/seed<S>/ (a
finished run is reused, so re-running the command resumes); the markdown table
is printed and written to OUT/ablation.md, the numbers to OUT/ablation.json.
The table gives per variant: mean and std over seeds, delta to the control,
its 95% bootstrap CI, a permutation p-value and Welch's t-test p-value
(see golfjax/stats.py for what 3 seeds can and cannot show).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import run_main


def main() -> int:
    from golfjax import ablate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file (configs/NAME.py)")
    parser.add_argument("--toggle", action="append", default=[], metavar="SECTION.FIELD=V0,V1[,...]",
                        help="values to compare; the first is the control's (repeatable)")
    parser.add_argument("--seeds", default="3", help="a count N (seeds 1..N) or a list 1,2,3 (one seed: 2,) (default 3)")
    parser.add_argument("--mode", choices=ablate.MODES, default="each",
                        help="several toggles: one at a time against the control (each) or every combination (grid)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="a fixed override for every run (repeatable)")
    parser.add_argument("--metric", choices=ablate.METRICS, default="roundtrip_val_bpb",
                        help="what to compare (default: the int8 round-trip val_bpb of the plain evaluation; "
                             "score_val_bpb: the configured eval.eval_mode's BPB on the same weights)")
    parser.add_argument("--out", default=None, help="runs and report directory (default runs/ablate-<time>)")
    parser.add_argument("--rerun", action="store_true", help="train again even when a run has finished")
    parser.add_argument("--cpu-devices", type=int, default=0, metavar="N", help="passed to scripts/train.py")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and check their configs; train nothing")
    args = parser.parse_args()

    toggles = [ablate.parse_toggle(t) for t in args.toggle]
    seeds = ablate.parse_seeds(args.seeds)
    variants = ablate.make_variants(toggles, args.mode)
    ablate.check_variants(args.config, args.overrides, variants, seeds)
    out = Path(args.out or f"runs/ablate-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"{len(variants)} variant(s) x {len(seeds)} seed(s) = {len(variants) * len(seeds)} run(s) in {out}")
    for v in variants:
        print(f"  {v.name}: --set {' --set '.join(v.overrides)}")
    if args.dry_run:
        return 0
    extra = ["--cpu-devices", str(args.cpu_devices)] if args.cpu_devices else []

    def train(config, overrides, run_dir):
        return ablate.subprocess_train(config, overrides, run_dir, extra_args=extra)

    result = ablate.run_ablation(args.config, toggles, seeds, out, base_overrides=args.overrides, mode=args.mode,
                                 metric=args.metric, train_fn=train, rerun=args.rerun)
    table = ablate.markdown_table(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(table, encoding="utf-8")
    (out / "ablation.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n", encoding="utf-8")
    print()
    print(table)
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.json'}")
    failed = sum(len(r.failures) for r in result.results)
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
