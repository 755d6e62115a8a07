"""Judge a calibrated edit where calibration never looked: held-out copies and the utility
cost on unseen ordinary prompts, with enough seeds to say whether the cost is within a budget.

The subspace a sanitized model carries (``memedit/``) is applied in memory to the original
model, so the original and the edit see the same prompts, seeds and sampler, and the utility
drop is paired image by image (its standard error is printed beside it).

Usage::

    python tools/measure_calibrated.py SANITIZED [--original DIR] [--seeds 4]
                                       [--ordinary-seeds 16] [--steps 50] [--out FILE.json]

Defaults to the embedded model's held-out memorized prompts and unseen ordinary scenes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import memedit  # noqa: E402
from memedit.calibration import copy_rates, utility_values  # noqa: E402
from memedit.evaluation.harness import EvalSettings  # noqa: E402
from memedit.evaluation.similarity import Scorer  # noqa: E402
from memedit.sampling import SamplingConfig  # noqa: E402
from memedit.testbed import prompt_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sanitized", type=Path)
    parser.add_argument("--original", default=None, help="default: the embedded model")
    parser.add_argument("--memorized", type=Path, default=prompt_file("memorized_heldout"))
    parser.add_argument("--ordinary", type=Path, default=prompt_file("ordinary_unseen"))
    parser.add_argument("--seeds", type=int, default=4, help="per memorized prompt")
    parser.add_argument("--ordinary-seeds", type=int, default=16, help="per ordinary prompt")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    subspace = memedit.Subspace.load(args.sanitized)
    pipe, _ = memedit.load_pipeline(args.original)
    settings = EvalSettings(sampling=SamplingConfig(steps=args.steps),
                            seeds=tuple(range(100, 100 + args.seeds)),
                            ordinary_seeds=tuple(range(100, 100 + args.ordinary_seeds)),
                            progress=False)
    memorized = memedit.read_prompts(args.memorized)
    ordinary = memedit.read_prompts(args.ordinary)
    scorer, threshold = Scorer("mse"), 0.01
    figures: dict = {"sanitized": str(args.sanitized), "zeroed": subspace.num_selected,
                     "k": subspace.manifest["method"]["k"],
                     "calibration": subspace.manifest.get("calibration"),
                     "memorized": {"file": str(args.memorized), "prompts": len(memorized),
                                   "seeds": args.seeds},
                     "ordinary": {"file": str(args.ordinary), "prompts": len(ordinary),
                                  "seeds": args.ordinary_seeds}, "steps": args.steps}
    values = {}
    for name, masks in (("original", None), ("edit", subspace.masks)):
        rate, near, median = copy_rates(pipe, masks, memorized, settings, scorer, threshold)
        utility_name, values[name] = utility_values(pipe, masks, ordinary, settings, None)
        figures[name] = {"copies": rate, "near_copies": near, "median_mse": median,
                         "utility": float(values[name].mean())}
        print(f"{name:9s} held-out copies {rate:.3f} (near {near:.3f}, median MSE "
              f"{median:.4f}); {utility_name} {values[name].mean():.3f}", flush=True)
    drop = values["original"] - values["edit"]
    figures["utility_drop"] = {"mean": float(drop.mean()),
                               "se": float(drop.std(ddof=1) / np.sqrt(len(drop))),
                               "images": len(drop), "measure": utility_name}
    figures["seconds"] = round(time.perf_counter() - start, 1)
    print(f"utility drop {drop.mean():+.4f} ± {figures['utility_drop']['se']:.4f} (s.e., "
          f"{len(drop)} paired images); {figures['seconds']} s")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
