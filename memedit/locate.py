"""Locate: record activation statistics for the memorized and the reference prompts, then
select the weights memorized prompts lean on and reference prompts do not."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from memedit import distributed
from memedit.artifacts import EMBEDDED_SPEC, FORMAT, FORMAT_VERSION, VERSION
from memedit.errors import MemeditError
from memedit.families import family_of, pipeline_conditioning
from memedit.hooks import ActivationRecorder, StopDenoising
from memedit.loading import ModelSource
from memedit.outputs import Inputs, atomic_output_dir, check_output, hold_output, input_paths
from memedit.prompts import PromptSet, empty_reference, read_prompts
from memedit.sampling import SamplingConfig, batches, run_pipeline
from memedit.selection import GRANULARITIES, select_layer
from memedit.statistics import ActivationStats, StatsInput, merge_stats, stats_files
from memedit.subspace import Subspace, model_identity, parameter
from memedit.targets import TARGET_KINDS, TargetLayer, find_target_layers, parse_target_kinds
from memedit.weights import read_tensors, tensor_sha256, zero_masked

if TYPE_CHECKING:
    from memedit.baking import BakeResult
    from memedit.calibration import CalibrationConfig
    from memedit.hardening import HardenConfig
    from memedit.hub import HubPush


@dataclass(frozen=True)
class LocateConfig:
    """The method's hyperparameters; defaults are the authors' best memorization setting."""

    targets: tuple[str, ...] = ("ff_out",)
    k: float = 0.01
    tau: int = 10
    rho: float = 0.0
    granularity: str = "weight"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def validate(self) -> None:
        parse_target_kinds(self.targets)
        if not 0 < self.k <= 1:
            raise MemeditError(f"k must be in (0, 1], got {self.k}.",
                               "k is a fraction of each layer's inputs: the authors use 0.01.")
        if self.tau < 1:
            raise MemeditError(f"tau must be at least 1, got {self.tau}.",
                               "tau counts the first UNet calls to aggregate: default 10.")
        if not 0 <= self.rho < 1:
            raise MemeditError(f"rho must be in [0, 1), got {self.rho}.",
                               "rho = 0 keeps the union over the tau calls.")
        if self.granularity not in GRANULARITIES:
            raise MemeditError(f"Unknown granularity {self.granularity!r}.",
                               f"Use one of {', '.join(GRANULARITIES)}.")


def unet_calls_per_image(pipe, steps: int) -> int:
    """How many times the pipeline calls the UNet for ``steps`` (PNDM: 50 steps = 51 calls)."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def stored_weights(pipe, source: ModelSource | None,
                   keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors as stored in the model's files (as loaded, for an in-memory pipeline).

    The one place locate reads the targeted weights from disk: :func:`locate` reads them
    once and hands them on (fingerprint, manifest)."""
    if source is not None:
        return read_tensors(source.path, keys, source.allow_pickle)
    return {key: parameter(pipe, key).detach().cpu() for key in keys}


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """One hash over the targeted weights: statistics of different models never merge."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(f"{key}={tensor_sha256(tensors[key])};".encode())
    return digest.hexdigest()


def model_fingerprint(pipe, source: ModelSource | None, layers: list[TargetLayer]) -> str:
    """:func:`fingerprint` of the targeted weights, read for this call."""
    return fingerprint(stored_weights(pipe, source, [layer.key for layer in layers]))


def _settings(pipe, source, layers, config: LocateConfig, unet_calls: int,
              model_hash: str | None = None) -> dict:
    return {
        "model_fingerprint": model_hash or model_fingerprint(pipe, source, layers),
        "scheduler": type(pipe.scheduler).__name__,
        "steps": config.sampling.steps,
        "guidance_scale": config.sampling.guidance_scale,
        "seed": config.sampling.seed,
        "height": config.sampling.height,
        "width": config.sampling.width,
        "targets": list(config.targets),
        "unet_calls": unet_calls,
    }


def record_statistics(pipe, prompts: PromptSet, config: LocateConfig,
                      source: ModelSource | None = None, progress: bool = True,
                      model_hash: str | None = None) -> ActivationStats:
    """Denoise ``prompts`` for the first tau UNet calls only, recording the target layers.

    Every prompt uses the same seed (the authors' protocol), in batches of
    ``config.sampling.batch_size``; both guidance halves pass through the hooks.
    ``model_hash``: the targeted weights' :func:`fingerprint` where the caller has it (else
    they are read to compute it).
    """
    if not len(prompts):
        raise MemeditError(f"The prompt set {prompts.name} is empty.", "Pass at least one prompt.")

    def run(batch: list[str]) -> None:
        run_pipeline(pipe, batch, [config.sampling.seed] * len(batch), config.sampling,
                     output_type="latent")

    return _record(pipe, prompts.prompts, run, prompts.name, prompts.sha256, config, source,
                   progress, model_hash)


def record_embedding_statistics(pipe, embeds: torch.Tensor, name: str, config: LocateConfig,
                                source: ModelSource | None = None, progress: bool = True,
                                model_hash: str | None = None) -> ActivationStats:
    """The same recording, driven by text conditionings ``y [N, T, d]`` instead of prompts
    (what an embedding attack optimizes; ``memedit.families`` says what ``y`` holds for each
    family). The text encoder does not run, so the targets must
    be UNet layers; the unconditional half is the empty prompt's, as in generation."""
    layers = find_target_layers(pipe, config.targets)
    if any(layer.component != "unet" for layer, _ in layers):
        raise MemeditError("Embeddings bypass the text encoder: its layers cannot be recorded "
                           "from them.", "Use UNet targets only (ff_out, ff_in, attn2_k, "
                           "attn2_v).")
    digest = hashlib.sha256(embeds.detach().float().cpu().numpy().tobytes()).hexdigest()

    def run(batch: list[torch.Tensor]) -> None:
        run_pipeline(pipe, None, [config.sampling.seed] * len(batch), config.sampling,
                     output_type="latent", **pipeline_conditioning(pipe, torch.stack(batch)))

    return _record(pipe, list(embeds), run, name, digest, config, source, progress,
                   model_hash)


def _record(pipe, items: list, run, name: str, sha256: str, config: LocateConfig,
            source: ModelSource | None, progress: bool,
            model_hash: str | None = None) -> ActivationStats:
    """Run ``run`` on batches of ``items`` under the recorder, stopping after tau UNet calls."""
    config.validate()
    layers = find_target_layers(pipe, config.targets)
    available = unet_calls_per_image(pipe, config.sampling.steps)
    if config.tau > available:
        raise MemeditError(
            f"tau = {config.tau} exceeds the {available} UNet calls of {config.sampling.steps} "
            "denoising steps.",
            f"Lower --tau to at most {available}, or raise --steps.",
        )
    needs_unet = any(layer.component == "unet" for layer, _ in layers)
    unet_calls = config.tau if needs_unet else 0
    item_batches = list(batches(items, config.sampling.batch_size))
    calls_per_batch = max(unet_calls, 1)
    bar = tqdm(total=len(item_batches) * calls_per_batch,
               disable=not progress or not distributed.state().is_main,
               desc=f"recording {name}", unit="UNet call")

    def record_batch(batch: list) -> dict[str, torch.Tensor]:
        """One batch's sums on a fresh recorder (a batch is the unit processes share)."""
        recorder = ActivationRecorder(pipe, layers, unet_calls,
                                      on_unet_call=lambda: bar.update(1))
        with recorder, torch.inference_mode():
            recorder.start_pipeline_call()
            with contextlib.suppress(StopDenoising):
                run(batch)
        if not needs_unet:
            bar.update(1)
        return {key: value.cpu() for key, value in recorder.sumsq.items()}

    # Per-batch sums added in batch order, whichever process ran each batch: the same
    # additions in the same order, so any number of processes gives the same bits.
    sumsq: dict[str, torch.Tensor] = {}
    for partial, computed_here in distributed.ordered_map(record_batch, item_batches):
        sumsq = {key: sumsq[key] + value if key in sumsq else value
                 for key, value in partial.items()}
        if not computed_here:
            bar.update(calls_per_batch)
    bar.close()
    return ActivationStats(
        sumsq,
        len(items),
        _settings(pipe, source, [layer for layer, _ in layers], config, unet_calls, model_hash),
        [{"name": name, "count": len(items), "sha256": sha256}],
    )


def select_subspace(pipe, memorized: ActivationStats, reference: ActivationStats,
                    config: LocateConfig, source: ModelSource | None = None,
                    allow_empty: bool = False,
                    stored: dict[str, torch.Tensor] | None = None) -> Subspace:
    """Turn the two sets' statistics into masks (method steps 4-6) and a manifest.

    A selection of no weight at all is an error unless ``allow_empty``: baked, it would be
    an unedited model that calls itself sanitized. ``stored``: the targeted weights as
    :func:`stored_weights` read them, where the caller has them (else they are read here).
    """
    config.validate()
    if memorized.settings != reference.settings:
        raise MemeditError(
            "The memorized and reference statistics were recorded with different settings.",
            "Record both with the same model, sampler and --targets.")
    layers = find_target_layers(pipe, config.targets)
    if stored is None:
        stored = stored_weights(pipe, source, [layer.key for layer, _ in layers])
    if memorized.settings.get("model_fingerprint") != fingerprint(stored):
        raise MemeditError("These statistics were recorded on another model.",
                           "Record statistics on the model you locate on.")
    if memorized.settings["unet_calls"] and config.tau > memorized.settings["unet_calls"]:
        raise MemeditError(
            f"tau = {config.tau} exceeds the {memorized.settings['unet_calls']} UNet calls "
            "the statistics hold.", "Lower --tau or record again with a larger one.")
    norms_mem, norms_ref = memorized.column_norms(), reference.column_norms()
    masks = {}
    for layer, module in layers:
        if layer.key not in norms_mem:
            raise MemeditError(f"The statistics have no entry for {layer.key}.",
                               "Record them with the same --targets.")
        masks[layer.key] = select_layer(module.weight.detach().cpu(), norms_mem[layer.key],
                                        norms_ref[layer.key], config.k, config.tau, config.rho,
                                        config.granularity).cpu()
    if not allow_empty and not any(mask.any() for mask in masks.values()):
        raise MemeditError(
            f"No weight was selected: in none of the {len(masks)} target layers did the "
            f"memorized prompts ({memorized.num_prompts}) lean on a weight more than the "
            "reference prompts do.",
            "Check that the prompts are memorized (`memedit detect`), raise --k or --tau, or "
            "pass --allow-empty to write the empty subspace anyway.")
    return Subspace(masks, build_manifest(pipe, source, masks, config, memorized, reference,
                                          stored))


def build_manifest(pipe, source: ModelSource | None, masks: dict[str, torch.Tensor],
                   config: LocateConfig, memorized: ActivationStats,
                   reference: ActivationStats,
                   stored: dict[str, torch.Tensor] | None = None) -> dict:
    if stored is None:
        stored = stored_weights(pipe, source, list(masks))
    tensors = {
        key: {"shape": list(stored[key].shape), "dtype": str(stored[key].dtype).split(".")[-1],
              "sha256_before": tensor_sha256(stored[key]),
              "sha256_after": tensor_sha256(zero_masked(stored[key], masks[key]))}
        for key in masks
    }
    layers = {key: {"selected": int(m.sum()), "total": m.numel(),
                    "fraction": float(m.sum()) / m.numel()} for key, m in masks.items()}
    selected = sum(v["selected"] for v in layers.values())
    total = sum(v["total"] for v in layers.values())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "memedit_version": VERSION,
        "method": {
            "name": "wanda-contrast (Chavhan et al. 2024, ConceptPrune protocol)",
            "targets": {t: TARGET_KINDS[t].description for t in config.targets},
            "k": config.k, "tau": config.tau, "rho": config.rho,
            "granularity": config.granularity,
            "sampling": asdict(config.sampling),
            "scheduler": type(pipe.scheduler).__name__,
        },
        "model": {
            "family": family_of(pipe).name,  # bake refuses a model of another family
            "spec": source.spec if source else None,
            "hub_id": source.hub_id if source else None,
            "path": str(source.path) if source else None,
            "tensors": tensors,
            # The UNet's other tensors (None for an in-memory pipeline: no files to hash).
            "identity": (model_identity(source.path, list(masks), source.allow_pickle)
                         if source else None),
        },
        "prompts": {"memorized": memorized.prompt_sets, "reference": reference.prompt_sets},
        "layers": layers,
        "total": {"selected": selected, "total": total,
                  "fraction": selected / total if total else 0.0},
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
    }


Stats = StatsInput | Sequence[StatsInput]


def _embedded_prompts(source: ModelSource | None, file: str, name: str,
                      missing: MemeditError) -> PromptSet:
    """The embedded test model's prompt file ``file``: the default for that model alone."""
    if source is None or source.spec != EMBEDDED_SPEC:
        raise missing
    from memedit.testbed import prompt_file

    return read_prompts(prompt_file(file), name=name)


def locate(pipe, memorized: PromptSet | None = None, reference: PromptSet | None = None,
           config: LocateConfig | None = None, source: ModelSource | None = None,
           progress: bool = True, allow_empty: bool = False,
           target: CalibrationConfig | None = None, ordinary: PromptSet | None = None,
           clip=None, hardening: HardenConfig | None = None, *,
           memorized_stats: Stats | None = None, reference_stats: Stats | None = None,
           save_stats: str | os.PathLike | None = None, overwrite: bool = False,
           inputs: Inputs = None) -> Subspace:
    """Find the memorization subspace of ``pipe``, as ``memedit locate`` does.

    ``memorized`` defaults, for the embedded test model only, to its locate half.
    ``reference`` defaults to the empty prompt (the authors' default). Since every prompt uses
    the same seed and statistics are normalised by prompt count, one empty prompt gives exactly
    the statistics of one empty prompt per memorized prompt, at a fraction of the cost.

    ``memorized_stats`` / ``reference_stats`` replace the prompts by saved statistics (a file,
    loaded statistics, or several of either, merged); ``save_stats`` is a new folder both
    sets' statistics are saved in (before selecting: they stay useful if the selection is
    refused), under the output policy (``overwrite``; ``inputs``: further paths it must spare).

    With ``target`` (see :mod:`memedit.calibration`), k is not ``config.k`` but the smallest
    k of ``target.ks`` whose edit copies at most ``target.target_rate`` on a validation part
    split off ``memorized``, within ``target.utility_budget`` on the ``ordinary`` prompts
    (scene utility, or the CLIP score with ``clip``); the curve goes into the manifest.

    With ``hardening`` (see :mod:`memedit.hardening`), the edit is grown in rounds by the
    weights that an embedding attack on the edited model leans on (``memorized`` need their
    training images); it cannot be combined with ``target``.

    The targeted weights are read from the model's files once, for the statistics'
    fingerprint and the manifest's hashes alike.
    """
    from memedit.calibration import calibrate, split_validation
    from memedit.hardening import harden

    config = config or LocateConfig()
    config.validate()
    if memorized is not None and memorized_stats is not None:
        raise MemeditError("Pass --memorized or --memorized-stats, not both.",
                           "Statistics files replace the prompt file.")
    if (target is not None or hardening is not None) and memorized_stats is not None:
        raise MemeditError("--target-rate and --harden-rounds work on the memorized prompts' "
                           "training images, and statistics files hold none.",
                           "Pass --memorized (JSONL with each prompt's training image).")
    if target is not None and hardening is not None:
        raise MemeditError("--target-rate and --harden-rounds cannot be combined yet.",
                           "Choose one of them.")
    validation = None
    if memorized_stats is None:
        if memorized is None:
            memorized = _embedded_prompts(source, "memorized_locate", "memorized", MemeditError(
                "--memorized is required for a model other than the embedded one.",
                "Pass a file of memorized prompts."))
        if target is not None:
            memorized, validation = split_validation(memorized, target.validation_fraction)
    if reference_stats is None and reference is None:
        reference = empty_reference(1)
    if save_stats is not None:
        check_output(save_stats, overwrite, _protected(source, memorized_stats,
                                                       reference_stats, inputs))
    layers = find_target_layers(pipe, config.targets)
    stored = stored_weights(pipe, source, [layer.key for layer, _ in layers])
    model_hash = fingerprint(stored)
    stats_mem = (merge_stats(memorized_stats) if memorized_stats is not None
                 else record_statistics(pipe, memorized, config, source, progress, model_hash))
    stats_ref = (merge_stats(reference_stats) if reference_stats is not None
                 else record_statistics(pipe, reference, config, source, progress, model_hash))
    if save_stats is not None:
        with atomic_output_dir(save_stats, overwrite,
                               _protected(source, memorized_stats, reference_stats, inputs),
                               "statistics") as folder:
            stats_mem.save(folder / "memorized.stats.safetensors")
            stats_ref.save(folder / "reference.stats.safetensors")
    if hardening is not None:
        return harden(pipe, memorized, stats_mem, stats_ref, config, hardening, source, progress,
                      stored)
    if validation is None:
        return select_subspace(pipe, stats_mem, stats_ref, config, source, allow_empty, stored)
    if ordinary is None:
        ordinary = _embedded_prompts(source, "ordinary_seen", "ordinary-seen", MemeditError(
            "--target-rate measures the edit's cost on ordinary prompts.",
            "Pass --ordinary FILE (and --clip FOLDER for the CLIP score)."))
    return calibrate(pipe, stats_mem, stats_ref, validation, ordinary, config, target, source,
                     clip, progress, stored)[0]


def _protected(source: ModelSource | None, memorized_stats: Stats | None,
               reference_stats: Stats | None, inputs: Inputs) -> list:
    """What a saved-statistics folder may not be, hold or lie in."""
    return [source.path if source is not None else None, *stats_files(memorized_stats),
            *stats_files(reference_stats), *input_paths(inputs)]


def locate_and_bake(pipe, out: str | os.PathLike, memorized: PromptSet | None = None,
                    reference: PromptSet | None = None, config: LocateConfig | None = None,
                    source: ModelSource | None = None, *, overwrite: bool = False,
                    inputs: Inputs = None, progress: bool = True,
                    push_to_hub: HubPush | None = None, **options) -> BakeResult | None:
    """Locate the subspace of ``pipe`` and write its model (``source``, the files ``pipe``
    was loaded from) with it zeroed to ``out``, as ``memedit locate-and-bake`` does.

    ``out`` (and ``save_stats``) are checked and locked before the sampling, not after it;
    ``options`` are :func:`locate`'s. Returns :func:`memedit.bake`'s result (its
    ``subspace`` is the one located); under several processes (``accelerate launch``) all of
    them locate, the main one bakes, and the others return None. With ``push_to_hub`` the
    model is uploaded once written (checked before the sampling)."""
    from memedit.baking import bake
    from memedit.hub import check_push

    if source is None:
        raise MemeditError("locate-and-bake writes the model's files, and an in-memory "
                           "pipeline has none.",
                           "Load the pipeline with memedit.load_pipeline and pass its source.")
    if push_to_hub is not None:
        check_push(push_to_hub)
    protected = [source.path, *stats_files(options.get("memorized_stats")),
                 *stats_files(options.get("reference_stats")), *input_paths(inputs)]
    with contextlib.ExitStack() as stack:
        stack.enter_context(hold_output(out, overwrite, protected))
        if options.get("save_stats") is not None:
            stack.enter_context(hold_output(options["save_stats"], overwrite, [*protected, out]))
        subspace = locate(pipe, memorized, reference, config, source, progress,
                          overwrite=overwrite, inputs=[*input_paths(inputs), out], **options)
        if not distributed.state().is_main:
            return None
        return bake(source, subspace, out, overwrite, source.allow_pickle, progress,
                    inputs=protected, push_to_hub=push_to_hub)
