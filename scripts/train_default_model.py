"""The recipe of the shipped default model ``models/ps3d-default`` (one command, fixed seeds).

    .venv/bin/python scripts/train_default_model.py --out models/ps3d-default --work /tmp/ps3d-default

1. Synthesises the training scans (``ps3d_core.synth``), seeds from 2000 up,
   a mix of every preset so that particle size, shape, phase contrast,
   touching rate and CT artefacts vary widely (``--mix``; scans already in
   ``WORK/scans`` are reused).
2. Trains with :func:`ps3d_core.training.train_model` (nnU-Net v2,
   :class:`~ps3d_core.training.trainer.PS3DTrainer`): ``--epochs`` x
   ``--iterations`` on the GPU when there is one, else on the CPU.
3. Evaluates the model and ThreshWater on held-out scans (seed 1000, never a
   training seed) for ``--eval-presets`` and writes the results and this
   command into ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from ps3d_core.io import write_text_atomic
from ps3d_core.synth import synthesize_samples
from ps3d_core.training import TrainingConfig, evaluate_model, pair_scans_with_labels, train_model, write_model_card

#: preset -> number of training scans; each preset's batch seed is TRAIN_SEED + its index here.
DEFAULT_MIX = {"tiny": 10, "small": 14, "typical": 10, "hard": 8}
TRAIN_SEED = 2000


def parse_mix(text: str) -> dict[str, int]:
    """``"tiny=10,small=14"`` -> ``{"tiny": 10, "small": 14}``."""
    return {name: int(count) for name, count in (item.split("=") for item in text.split(",") if item)}


def synthesize_training_scans(root: Path, mix: dict[str, int]) -> None:
    for index, (preset, count) in enumerate(mix.items()):
        done = len(list(root.glob(f"synth-{preset}-s{TRAIN_SEED + index}-*/_SCAN_COMPLETE")))
        if done >= count:
            continue
        t0 = time.perf_counter()
        synthesize_samples(root, preset, count, TRAIN_SEED + index)
        print(f"{count} {preset} scans in {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/ps3d-default"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/ps3d-default"))
    parser.add_argument("--mix", type=parse_mix, default=DEFAULT_MIX, help="preset=count,... (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--target-size", type=float, default=TrainingConfig().target_particle_size)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--time-budget-minutes", type=float, default=None,
                        help="shorten the epochs to finish training within this time (CPU runs)")
    parser.add_argument("--init", default=None, help="fine-tune from this model folder instead of starting afresh")
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--eval-presets", nargs="*", default=["typical", "hard"])
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run of the same settings in --work")
    parser.add_argument("--data-only", action="store_true", help="only synthesise the training scans")
    args = parser.parse_args()

    scans = args.work / "scans"
    synthesize_training_scans(scans, args.mix)
    if args.data_only:
        return
    cases = pair_scans_with_labels(scans, scans / "_truth")
    mix = ", ".join(f"{n} {p}" for p, n in args.mix.items())
    config = TrainingConfig(
        name="ps3d-default",
        version=args.version,
        target_particle_size=args.target_size,
        epochs=args.epochs,
        iterations_per_epoch=args.iterations,
        device=args.device,
        time_budget_minutes=args.time_budget_minutes,
        init_model=args.init,
        training_data=f"{len(cases)} synthetic scans ({mix}; ps3d_core.synth, batch seeds from {TRAIN_SEED})",
    )
    folder = train_model(cases, args.out, config, work_dir=args.work / "nnunet", resume=args.resume)
    recipe = " ".join(shlex.quote(a) for a in [".venv/bin/python", "scripts/train_default_model.py", *sys.argv[1:]])
    write_model_card(folder, (), recipe)
    evaluations = []
    for preset in args.eval_presets:
        result = evaluate_model(folder, preset=preset, samples=args.eval_samples, seed=1000, progress=print)
        evaluations.append(result)
        write_text_atomic(folder / f"evaluation_{preset}.json", json.dumps(result, indent=1))
        write_model_card(folder, evaluations, recipe)
        print(json.dumps(result["mean"], indent=1), flush=True)


if __name__ == "__main__":
    main()
