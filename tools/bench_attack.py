"""Benchmark: what the embedding attack costs, per prompt and per Adam step, and per image.

Loads the model once, then for each --prompt-batch value optimizes the prompts' embeddings
for --attack-steps steps (the published 8 noise/timestep pairs a step) and generates one
image per prompt from the result (--steps denoising steps, guidance 7.5). Each figure is the
best of --repeats runs (other load on the machine only slows a run). A full `memedit attack`
costs about prompts x steps x (per prompt-step) for the target, as much again for the
control, plus (checkpoints + 1) x prompts x seeds images, twice.

    .venv/bin/python tools/bench_attack.py                      # embedded model, 10 prompts
    .venv/bin/python tools/bench_attack.py --model DIR --prompts FILE --prompt-batch 1,4
"""

from __future__ import annotations

import argparse
import json
import time

from tabulate import tabulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Pipeline folder (default: the embedded model).")
    parser.add_argument("--prompts", help="Memorized prompts with training images (default: "
                                          "the embedded model's held-out half).")
    parser.add_argument("--prompt-batch", default="1,5,10",
                        help="Comma-separated prompts optimized together.")
    parser.add_argument("--attack-steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50, help="Denoising steps per image.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="Also write the rows to this JSON file.")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from memedit.evaluation.attack import (
        AttackConfig,
        frozen,
        generate_from_embeddings,
        optimize_embeddings,
        prompt_embeddings,
        target_latents,
    )
    from memedit.evaluation.harness import EvalSettings
    from memedit.loading import load_pipeline
    from memedit.prompts import read_prompts
    from memedit.sampling import SamplingConfig, batches

    if args.prompts is None:
        from memedit.testbed import prompt_file

        args.prompts = prompt_file("memorized_heldout")
    pipe, source = load_pipeline(args.model, device=args.device)
    prompts = read_prompts(args.prompts)
    settings = EvalSettings(sampling=SamplingConfig(steps=args.steps), progress=False)
    y_all = prompt_embeddings(pipe, prompts.prompts)
    z_all = target_latents(pipe, prompts, settings.sampling)
    negative = prompt_embeddings(pipe, [""]).cpu()

    def optimize(prompt_batch: int) -> float:
        config = AttackConfig(steps=args.attack_steps, pairs=args.pairs, checkpoints=())
        start = time.perf_counter()
        with frozen(pipe):
            for chunk in batches(range(len(prompts)), prompt_batch):
                gens = [torch.Generator().manual_seed(i) for i in chunk]
                optimize_embeddings(pipe, y_all[chunk], z_all[chunk], config, gens)
        return time.perf_counter() - start

    def generate() -> float:
        start = time.perf_counter()
        generate_from_embeddings(pipe, y_all.cpu(), negative, [100] * len(prompts), settings)
        return time.perf_counter() - start

    optimize(len(prompts))  # warm-up: lazy initialisation of kernels and allocators
    rows = []
    for prompt_batch in (int(v) for v in args.prompt_batch.split(",")):
        seconds = min(optimize(prompt_batch) for _ in range(args.repeats))
        steps = len(prompts) * args.attack_steps
        rows.append({"prompt_batch": prompt_batch, "prompts": len(prompts),
                     "attack_steps": args.attack_steps, "pairs": args.pairs,
                     "optimize_s": seconds, "per_prompt_s": seconds / len(prompts),
                     "per_prompt_step_ms": 1000 * seconds / steps})
    image_s = min(generate() for _ in range(args.repeats)) / len(prompts)
    print(f"model {source.spec}, device {pipe.device}, {args.threads} thread(s); "
          f"{len(prompts)} prompts, {args.attack_steps} Adam steps of {args.pairs} pairs; "
          f"best of {args.repeats}")
    print(tabulate([[r["prompt_batch"], f"{r['optimize_s']:.2f}", f"{r['per_prompt_s']:.3f}",
                     f"{r['per_prompt_step_ms']:.1f}"] for r in rows],
                   headers=["prompt batch", "attack s", "s per prompt", "ms per prompt-step"]))
    print(f"generation: {image_s:.3f} s per image ({args.steps} steps, guidance 7.5, "
          f"batch 8)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": source.spec, "rows": rows, "generate_s_per_image": image_s},
                      handle, indent=2)


if __name__ == "__main__":
    main()
