"""Locate and bake on a Stable Diffusion 1.x-shaped pipeline (real architecture, random
weights): real layer names and sizes, PNDM's extra UNet call, a 4 GB folder to copy, and the
time and peak memory of each phase on this machine.

    .venv/bin/python tools/check_sd1_shaped.py --workdir /tmp/sd1-check [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch

import memedit
from memedit.locate import unet_calls_per_image
from memedit.sampling import SamplingConfig
from memedit.testing import build_sd1_shaped_pipeline


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="image height and width")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures: dict = {}

    def phase(name: str, start: float) -> None:
        figures[name] = {"seconds": round(time.perf_counter() - start, 1),
                         "peak_rss_gb_so_far": round(peak_rss_gb(), 2)}
        print(name, figures[name], flush=True)

    shutil.rmtree(args.workdir, ignore_errors=True)
    start = time.perf_counter()
    build_sd1_shaped_pipeline().save_pretrained(args.workdir / "sd1", safe_serialization=True)
    phase("build_and_save", start)

    start = time.perf_counter()
    pipe, source = memedit.load_pipeline(args.workdir / "sd1")
    phase("load", start)
    prompts = memedit.PromptSet.from_prompts(
        [f"a photo of a red cat number {i}" for i in range(args.prompts)], "memorized")
    config = memedit.LocateConfig(sampling=SamplingConfig(
        steps=50, batch_size=args.prompts, height=args.size, width=args.size))
    start = time.perf_counter()
    subspace = memedit.locate(pipe, prompts, config=config, source=source)
    phase("locate", start)
    figures["unet_calls_for_50_steps"] = unet_calls_per_image(pipe, 50)
    del pipe

    start = time.perf_counter()
    memedit.bake(args.workdir / "sd1", subspace, args.workdir / "sanitized")
    phase("bake", start)
    start = time.perf_counter()
    report = memedit.verify_sanitized(args.workdir / "sanitized")
    phase("verify", start)
    figures["layers"] = len(subspace.masks)
    figures["shapes"] = sorted({str(tuple(m.shape)) for m in subspace.masks.values()})
    figures["zeroed"] = subspace.totals()
    figures["verified"] = report.ok
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
