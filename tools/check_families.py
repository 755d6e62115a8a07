"""Every registered model family on its tiny fixture: locate (UNet and every text encoder),
bake, export to ONNX with parity and the sanitization audit; prints what was zeroed and
ONNX Runtime's error against PyTorch per graph (the README's "Model families" figures).

    .venv/bin/python tools/check_families.py --workdir /tmp/families [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import memedit
from memedit.export.api import export_onnx
from memedit.families import FAMILIES
from memedit.sampling import SamplingConfig
from memedit.testing import save_tiny_pipeline


def check(name: str, workdir: Path) -> dict:
    model = save_tiny_pipeline(workdir / name, family=name)
    pipe, source = memedit.load_pipeline(model, "cpu", "float32")
    params = sum(p.numel() for c in pipe.components.values() if isinstance(c, torch.nn.Module)
                 for p in c.parameters())
    prompts = memedit.PromptSet.from_prompts(
        ["the painting of cat 0", "the painting of cat 1"], "memorized")
    config = memedit.LocateConfig(targets=("ff_out", "text_mlp"), k=0.05, tau=2,
                                  sampling=SamplingConfig(steps=10, batch_size=2))
    subspace = memedit.locate(pipe, prompts, config=config, source=source)
    del pipe
    memedit.bake(model, subspace, workdir / f"{name}-baked")
    start = time.perf_counter()
    report = export_onnx(workdir / f"{name}-baked", workdir / f"{name}-onnx", threads=1)
    per_component: dict[str, int] = {}
    for key, mask in subspace.masks.items():
        component = key.split("/")[0]
        per_component[component] = per_component.get(component, 0) + int(mask.sum())
    return {
        "parameters": params,
        "zeroed": per_component,
        "export_and_verify_seconds": round(time.perf_counter() - start, 1),
        "verdict": report.verdict,
        "audit_passed": report.audit.passed,
        "parity": {c.name: {"max_abs": c.max_abs, "mean_abs": c.mean_abs,
                            "psnr_db": c.psnr_db} for c in report.parity.comparisons},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    figures = {}
    for name in sorted(FAMILIES):
        figures[name] = check(name, args.workdir)
        print(name, json.dumps(figures[name]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
