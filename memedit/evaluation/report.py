"""The evaluation report: one JSON file with every figure and the settings behind it, and a
short table for the terminal.

The table names its measure, threshold and aggregation in its header lines: memorization
numbers from different papers differ in all three, so a number without them means little.
"""

from __future__ import annotations

import json
import math
import platform
from datetime import datetime, timezone

from tabulate import tabulate

from memedit.evaluation.harness import EvaluationResult, VariantResult
from memedit.evaluation.similarity import MEASURES
from memedit.evaluation.utility import headline

REPORT_FORMAT = "memedit-evaluation"
REPORT_VERSION = 1


def build_report(result: EvaluationResult, context: dict | None = None) -> dict:
    """Everything as plain JSON: settings, prompt sets (with hashes), variants, notes."""
    import torch

    from memedit import __version__

    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "memedit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": result.settings.describe(),
        "context": result.context | (context or {}),
        "prompt_sets": {
            name: {"name": group.name, "source": group.source, "count": len(group),
                   "sha256": group.sha256}
            for name, group in (result.groups | {"ordinary": result.ordinary}).items()
        },
        "variants": [variant.to_json() for variant in result.variants],
        "notes": result.notes,
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
    }


def report_json(report: dict) -> bytes:
    # NaN is not JSON: write null for undefined figures (e.g. an AUROC with no negatives).
    return (json.dumps(_finite(report), indent=2, sort_keys=False) + "\n").encode()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"
    return str(value)


def _primary(variant: VariantResult, group: str, measure: str, threshold: str | None):
    data = variant.memorization.get(group, {}).get("measures", {}).get(measure)
    if data is None:
        return None, None
    rate = data.get("rates", {}).get(threshold, {}).get("generation_rate") if threshold else None
    return rate, data["median"]


def _attacked_rate(variant: VariantResult, group: str, measure: str,
                   threshold: str | None) -> float | None:
    attacked = variant.memorization.get(group, {}).get("under_attack", {})
    data = attacked.get("measures", {}).get(measure, {})
    return data.get("rates", {}).get(threshold, {}).get("generation_rate") if threshold else None


def _utility_cell(variant: VariantResult) -> tuple[str, str]:
    utility = variant.utility
    parts = []
    if "scene" in utility:
        scene = utility["scene"]
        key = headline(scene)
        parts.append(f"scene {key} {_fmt(scene[key], 2)}")
    if "clip_score" in utility:
        parts.append(f"CLIP {_fmt(utility['clip_score']['mean'], 2)}")
    moved = utility.get("drift_from_original", {}).get("mse", {}).get("mean")
    return ", ".join(parts) or "-", _fmt(moved)


def table(result: EvaluationResult) -> str:
    """A compact terminal table: one row per variant."""
    settings = result.settings
    measure = settings.measure
    thresholds = settings.resolved_thresholds
    threshold = str(thresholds[0]) if thresholds else None
    groups = list(result.groups)
    headers = ["variant", "zeroed"]
    for group in groups:
        headers += [f"mem {group}", f"median {measure} {group}"]
    attacked = settings.attack is not None
    if attacked:
        headers.append("under attack " + " / ".join(groups))
    headers += ["detector AUROC", "utility", "drift MSE"]
    rows = []
    for variant in result.variants:
        size = variant.size
        zeroed = "-" if size is None else f"{size['selected']} ({size['fraction']:.2%})"
        # NeMo's row names its mode and what it simplifies (the JSON keeps the short name).
        label = variant.info.get("method", variant.name) if variant.kind == "nemo" \
            else variant.name
        row = [label, zeroed]
        for group in groups:
            rate, median = _primary(variant, group, measure, threshold)
            row += [_fmt(rate, 2), _fmt(median)]
        if attacked:
            row.append(" / ".join(_fmt(_attacked_rate(variant, g, measure, threshold), 2)
                                  for g in groups))
        aurocs = variant.detector.get("auroc", {})
        row.append(" / ".join(_fmt(aurocs.get(g), 2) for g in groups))
        row += list(_utility_cell(variant))
        rows.append(row)
    direction = MEASURES[measure].symbol
    header = (f"memorized = {measure} {direction} {threshold} (share of generations); "
              f"{settings.gt_aggregate} over training images; median over prompts of the mean "
              f"over {len(settings.seeds)} seeds; detector AUROC vs ordinary prompts "
              f"({' / '.join(groups)}), "
              + ("every step" if settings.detector_steps is None
                 else f"first {settings.detector_steps} steps")
              + (", DDIM" if settings.detector_scheduler == "ddim" else ""))
    if attacked:
        header += (f"; under attack = memorized after the embedding attack (Adam lr "
                   f"{settings.attack.lr:g}, {settings.attack.steps} steps on y)")
    if threshold is None:
        header = f"{measure}: no threshold; " + header.split("; ", 1)[1]
    lines = [header, tabulate(rows, headers=headers, tablefmt="simple")]
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)



def detect_table(prompts: list[str], scores: list[float], first_step: list[float]) -> str:
    """The detector ranking, highest (most likely memorized) first."""
    order = sorted(range(len(prompts)), key=lambda i: -scores[i])
    rows = [[rank + 1, _fmt(scores[i], 4), _fmt(first_step[i], 4), prompts[i][:70]]
            for rank, i in enumerate(order)]
    return tabulate(rows, headers=["rank", "score", "step 1", "prompt"], tablefmt="simple")
