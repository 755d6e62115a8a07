"""The Python API end to end: locate the memorization subspace, inspect it, bake it, verify.

    .venv/bin/python examples/locate_and_bake.py                       # embedded test model
    .venv/bin/python examples/locate_and_bake.py --model CompVis/stable-diffusion-v1-4 \
        --memorized sdv1_500_memorized.jsonl --out sd14-sanitized       # a real checkpoint
"""

from __future__ import annotations

import argparse

import memedit
from memedit.testbed import prompt_file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="pipeline folder or hub id")
    parser.add_argument("--memorized", default=None, help="memorized prompts (txt/jsonl/csv)")
    parser.add_argument("--out", default="runs/example-sanitized")
    args = parser.parse_args()

    pipe, source = memedit.load_pipeline(args.model)  # CUDA + fp16 if present, else CPU + fp32
    memorized = memedit.read_prompts(args.memorized or prompt_file("memorized_locate"))
    config = memedit.LocateConfig(k=0.01, tau=10, rho=0.0)  # the authors' defaults

    # Statistics per prompt set are plain sums: record, save, and merge runs if you like.
    stats_mem = memedit.record_statistics(pipe, memorized, config, source)
    stats_ref = memedit.record_statistics(pipe, memedit.empty_reference(1), config, source)
    subspace = memedit.select_subspace(pipe, stats_mem, stats_ref, config, source)
    print(f"located {subspace.num_selected:,} of {subspace.num_weights:,} weights "
          f"({100 * subspace.totals()['fraction']:.2f}%) in {len(subspace.masks)} layers")

    result = memedit.bake(args.model, subspace, args.out, overwrite=True)
    report = memedit.verify_sanitized(result.path)
    print(f"wrote {result.path}; verified: {report.ok} ({report.zeroed:,} weights zeroed, "
          f"{report.tensors_checked} tensors checked)")

    # The sanitized folder is a plain diffusers pipeline: no memedit needed at inference.
    from diffusers import StableDiffusionPipeline

    sanitized = StableDiffusionPipeline.from_pretrained(result.path)
    image = sanitized(memorized.prompts[0], num_inference_steps=20).images[0]
    image.save(f"{args.out}-first-prompt.png")


if __name__ == "__main__":
    main()
