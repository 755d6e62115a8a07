"""Pictures of an evaluation: a grid of training image | generations, and the sweep plot."""

from __future__ import annotations

import io

import numpy as np

from memedit.evaluation.harness import EvaluationResult, VariantResult
from memedit.evaluation.similarity import MEASURES, load_image, resize, to_pil
from memedit.evaluation.utility import headline


def image_grid(result: EvaluationResult, cell: int = 128) -> bytes | None:
    """PNG: one row per prompt (first seed), columns training image | each variant.

    ``None`` when no variant kept grid images (no training images to compare with).
    """
    from PIL import Image, ImageDraw, ImageFont

    kept = [v for v in result.variants if v.grid_images.get("images")]
    if not kept:
        return None
    group_name = kept[0].grid_images["group"]
    records = result.groups[group_name].records[: len(kept[0].grid_images["images"])]
    labels = ["training image"] + [v.name for v in kept]
    font = ImageFont.load_default(size=12)
    header, caption = 20, 16
    width = cell * len(labels)
    height = header + len(records) * (cell + caption)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for col, label in enumerate(labels):
        draw.text((col * cell + 4, 4), label[:22], fill="black", font=font)
    for row, record in enumerate(records):
        top = header + row * (cell + caption)
        draw.text((4, top + 1), f"[{group_name}] {record.prompt}"[: width // 7], fill="black",
                  font=font)
        cells = [load_image(record.images[0])] + [v.grid_images["images"][row] for v in kept]
        for col, image in enumerate(cells):
            canvas.paste(_cell(image, cell), (col * cell, top + caption))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _cell(image: np.ndarray, size: int):
    from PIL import Image

    if max(image.shape[:2]) <= size // 2:
        # Small images (the embedded model's 32 px) are blown up without smoothing, so what
        # is compared pixel by pixel is what is shown.
        return to_pil(image).resize((size, size), Image.Resampling.NEAREST)
    return to_pil(resize(image, size, size))


def _median(variant: VariantResult, group: str, measure: str) -> float | None:
    data = variant.memorization.get(group, {}).get("measures", {}).get(measure, {})
    return data.get("median")


def _rate(variant: VariantResult, group: str, measure: str, threshold: str) -> float | None:
    data = variant.memorization.get(group, {}).get("measures", {}).get(measure, {})
    return data.get("rates", {}).get(threshold, {}).get("generation_rate")


def _utility(variant: VariantResult) -> tuple[str, float | None]:
    utility = variant.utility
    if "scene" in utility:
        scene = utility["scene"]
        key = headline(scene)
        return f"scene utility ({key})", scene[key]
    if "clip_score" in utility:
        return "CLIP score", utility["clip_score"]["mean"]
    if "drift_from_original" in utility:
        return "drift from original (SSIM, 1 = unchanged)", \
            utility["drift_from_original"]["ssim"]["mean"]
    return "drift from original (SSIM, 1 = unchanged)", 1.0 if variant.kind == "original" \
        else None


def sweep_plot(result: EvaluationResult) -> bytes | None:
    """PNG: memorization rate and utility against k for located and random masks, with the
    original and NeMo as horizontal lines. ``None`` without a threshold-based measure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = result.settings
    thresholds = settings.resolved_thresholds
    if not thresholds:
        return None
    threshold, measure = str(thresholds[0]), settings.measure
    by_kind: dict[str, list[VariantResult]] = {}
    for variant in result.variants:
        by_kind.setdefault(variant.kind, []).append(variant)
    if "located" not in by_kind:
        return None
    # Rate at the threshold, and the median score: the score shows movement that has not
    # (yet) crossed the threshold, so "no change in rate" is not read as "no effect".
    fig, (ax_mem, ax_med, ax_util) = plt.subplots(1, 3, figsize=(15, 4))
    # Colour names the variant kind, line style the prompt group.
    colours = {"located": "tab:blue", "random": "tab:gray"}
    group_styles = {"locate": "--o", "heldout": "-s"}
    utility_label = None
    all_ks = sorted({v.k for v in result.variants if v.k is not None})
    for kind, colour in colours.items():
        variants = sorted(by_kind.get(kind, []), key=lambda v: v.k)
        ks = [v.k for v in variants]
        for group in result.groups:
            rates = [_rate(v, group, measure, threshold) for v in variants]
            style = group_styles.get(group, "-o")
            if ks and None not in rates:
                ax_mem.plot(ks, rates, style, color=colour, label=f"{kind} ({group})")
            medians = [_median(v, group, measure) for v in variants]
            if ks and None not in medians:
                ax_med.plot(ks, medians, style, color=colour, label=f"{kind} ({group})")
        utilities = [_utility(v) for v in variants]
        if ks and utilities and None not in [u[1] for u in utilities]:
            utility_label = utilities[0][0]
            ax_util.plot(ks, [u[1] for u in utilities], "-o", color=colour, label=kind)
    for kind, colour in (("original", "black"), ("nemo", "tab:red")):
        for variant in by_kind.get(kind, []):
            rate = _rate(variant, "heldout", measure, threshold)
            if rate is not None:
                ax_mem.axhline(rate, color=colour, linestyle=":", label=f"{kind} (heldout)")
            median = _median(variant, "heldout", measure)
            if median is not None:
                ax_med.axhline(median, color=colour, linestyle=":", label=f"{kind} (heldout)")
            label, value = _utility(variant)
            if value is not None:
                utility_label = utility_label or label
                ax_util.axhline(value, color=colour, linestyle=":", label=kind)
    direction = MEASURES[measure].symbol
    ax_mem.set(xscale="log", xlabel="k (fraction of each row's inputs)",
               ylabel=f"memorization rate ({measure} {direction} {threshold})", ylim=(-0.02, 1.02))
    ax_med.set(xscale="log", xlabel="k",
               ylabel=f"median {measure} to the training image over prompts")
    ax_util.set(xscale="log", xlabel="k", ylabel=utility_label or "utility")
    for ax in (ax_mem, ax_med, ax_util):
        ax.set_xticks(all_ks, [f"{k:g}" for k in all_ks])
        ax.minorticks_off()
    ax_mem.legend(fontsize=7)
    ax_med.legend(fontsize=7)
    ax_util.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()

