"""Inspect a subspace or a sanitized model, and verify a sanitized model: every weight equal to
the original's, except exactly the masked ones, which must be zero.

A verification ends in one of three verdicts, and says what it established and what not:

- ``OK``: every check that ran passed, and the model carries its provenance;
- ``FAILED``: a check found a difference (a restored weight, masks that disagree with their
  manifest or with an independent copy, a tensor that is not the original's);
- ``NOT VERIFIABLE``: nothing found wrong, but something needed is missing (the model's
  provenance, the original, the manifest's hashes), so no OK can be given.

Everything in the model folder, the carried subspace included, can be rewritten by whoever
can write the folder: the manifest's records (sha256 after baking, counts, ``model.identity``)
catch a model edited behind the manifest's back, not a manifest rewritten to match. Only what
comes from outside the folder confirms the carried subspace itself: ``subspace`` (a copy kept
elsewhere), ``expect_digest`` (:meth:`Subspace.digest` noted elsewhere) and ``original``.
"""

from __future__ import annotations

import filecmp
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from memedit.artifacts import MANIFEST_FILE, MASKS_FILE, PROVENANCE_DIR, PROVENANCE_FILE
from memedit.card import CARD_FILE, SOURCE_CARD, base_card
from memedit.errors import MemeditError
from memedit.loading import PICKLE_SUFFIXES, resolve_model
from memedit.subspace import Subspace, model_identity
from memedit.weights import read_state, tensor_sha256, weight_files, zero_masked

OK, FAILED, NOT_VERIFIABLE = "OK", "FAILED", "NOT VERIFIABLE"
EXIT_STATUS = {OK: 0, FAILED: 1, NOT_VERIFIABLE: 3}  # 2 stays the CLI's user error


@dataclass
class Verification:
    """What a verification checked, what it found wrong and what it could not establish."""

    path: str
    original: str | None = None
    tensors_checked: int = 0
    edited_tensors: int = 0
    zeroed: int = 0
    files_checked: int = 0
    digest: str | None = None  # of the subspace the path carries (or is)
    problems: list[str] = field(default_factory=list)  # differences found: FAILED
    unverified: list[str] = field(default_factory=list)  # missing inputs: NOT VERIFIABLE
    unconfirmed: list[str] = field(default_factory=list)  # passed, but rests on the folder only
    established: list[str] = field(default_factory=list)
    subspace: Subspace | None = field(default=None, repr=False)  # the one checked against

    @property
    def verdict(self) -> str:
        if self.problems:
            return FAILED
        return NOT_VERIFIABLE if self.unverified else OK

    @property
    def ok(self) -> bool:
        return self.verdict == OK

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "ok": self.ok, "path": self.path,
                "original": self.original, "digest": self.digest,
                "tensors_checked": self.tensors_checked, "edited_tensors": self.edited_tensors,
                "zeroed": self.zeroed, "other_files_checked": self.files_checked,
                "established": self.established, "problems": self.problems,
                "not_established": self.unverified + self.unconfirmed}

    def render(self, limit: int = 20) -> str:
        lines = [f"verification: {self.verdict}"]
        if self.original:
            lines.append(f"  original: {self.original}")
        if self.digest:
            lines.append(f"  subspace digest: {self.digest}")
        for title, items in (("established", self.established), ("problems", self.problems),
                             ("not established", self.unverified + self.unconfirmed)):
            if items:
                lines.append(f"  {title}:")
                lines += [f"    - {item}" for item in items[:limit]]
                if len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more")
        return "\n".join(lines)


def provenance(model_dir: Path) -> dict | None:
    """The ``memedit/sanitized.json`` that bake wrote into ``model_dir``, or None."""
    path = Path(model_dir) / PROVENANCE_DIR / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        info = None
    if not isinstance(info, dict):
        raise MemeditError(f"{path} is not the JSON object `memedit bake` writes.",
                           "The model's provenance is damaged: bake the model again.")
    return info


def is_pipeline_folder(path: Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def _original_state(folder: Path, name: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The original of a sanitized weight file (a pickle may have become safetensors)."""
    candidate = folder / name
    if candidate.is_file():
        return read_state(candidate)
    stem = Path(name).stem
    for suffix in PICKLE_SUFFIXES:
        for pickled in (folder / f"{stem}{suffix}", folder / f"pytorch_model{suffix}"):
            if pickled.is_file() and (stem == pickled.stem or stem == "model") and allow_pickle:
                return read_state(pickled)
    raise FileNotFoundError(name)


def _named_tensors(path: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """Only ``names`` of one weight file: the masked tensors, not the whole UNet."""
    if path.suffix in PICKLE_SUFFIXES:
        state = read_state(path)
        return {name: state[name] for name in names & state.keys()}
    with safe_open(str(path), "pt") as handle:
        return {name: handle.get_tensor(name) for name in names & set(handle.keys())}


def _check_subspace(report: Verification, reference: Subspace) -> None:
    """The masks against the manifest's own records (counts; hashes are checked on tensors)."""
    problems, gaps = reference.check_manifest()
    report.problems += problems
    report.unverified += gaps
    if not problems and not gaps:
        report.established.append(
            f"the masks select the per-layer counts and total the manifest records "
            f"({reference.num_selected:,} weights in {len(reference.masks)} tensors)")


def _check_edited(report: Verification, sanitized: Path, reference: Subspace,
                  allow_pickle: bool) -> None:
    """Every edited tensor, in every weight file: zero where masked; in the primary files
    (what diffusers loads) also the tensor the manifest records after baking (sha256)."""
    records = reference.tensor_records()
    found: set[str] = set()
    before = len(report.problems)
    for component, masks in reference.by_component().items():
        if not (sanitized / component).is_dir():
            report.problems.append(f"{component}/ is missing from the sanitized model")
            continue
        for weight_file in weight_files(sanitized / component, allow_pickle):
            relative = weight_file.path.relative_to(sanitized)
            for name, tensor in _named_tensors(weight_file.path, set(masks)).items():
                key, mask = f"{component}/{name}", masks[name]
                if tensor.shape != mask.shape:
                    report.problems.append(f"{relative}: {name} has shape "
                                           f"{tuple(tensor.shape)}, its mask {tuple(mask.shape)}")
                    continue
                nonzero = int(torch.count_nonzero(tensor[mask]))
                if nonzero:
                    report.problems.append(f"{relative}: {name} has {nonzero:,} masked weights "
                                           "that are not zero")
                if not weight_file.primary:
                    continue
                found.add(key)
                expected = records.get(key, {}).get("sha256_after")
                if expected is not None and tensor_sha256(tensor) != expected:
                    report.problems.append(f"{relative}: {name} is not the tensor the manifest "
                                           "records after baking (sha256_after differs)")
    report.problems += [f"{key} is missing from the sanitized model"
                        for key in sorted(reference.masks.keys() - found)]
    report.edited_tensors = len(found)
    report.zeroed = sum(int(reference.masks[key].sum()) for key in found)
    if len(report.problems) == before:
        hashed = "" if reference.missing_hashes() else " and hash to the manifest's sha256_after"
        report.established.append(f"the {len(found)} edited tensors are zero at all "
                                  f"{report.zeroed:,} masked positions{hashed}")


def _check_identity(report: Verification, sanitized: Path, reference: Subspace,
                    allow_pickle: bool) -> None:
    recorded = reference.identity()
    if recorded is None:
        report.unconfirmed.append("the UNet's other tensors against the located model: the "
                                  "manifest records no model.identity")
        return
    if model_identity(sanitized, reference.masks, allow_pickle)["sha256"] != recorded.get(
            "sha256"):
        report.problems.append("unet/: tensors the subspace does not edit differ from the "
                               "located model's (model.identity sha256 differs)")
    else:
        report.established.append("the UNet's other tensors are the located model's "
                                  "(model.identity)")


def _compare_with_original(report: Verification, sanitized: Path, source: Path,
                           reference: Subspace, allow_pickle: bool) -> None:
    """Every file and tensor of the sanitized model against the original's."""
    before_count = len(report.problems)
    masks = reference.by_component()
    records = reference.tensor_records()
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or relative.parts[0] == PROVENANCE_DIR:
            continue
        # The original's card is kept unchanged beside the edited model's own card (for an
        # original memedit baked, its base model's card: the original's README.md is not kept).
        if relative == Path(CARD_FILE):
            path = base_card(source)
            if not path.is_file():
                continue
        twin = sanitized / (SOURCE_CARD if relative == Path(CARD_FILE) else relative)
        is_weight = path.suffix == ".safetensors" or path.suffix in PICKLE_SUFFIXES
        if not is_weight:
            report.files_checked += 1
            if not twin.is_file() or not filecmp.cmp(path, twin, shallow=False):
                report.problems.append(f"{relative} differs from the original")
    for component_dir in sorted(p for p in sanitized.iterdir() if p.is_dir()):
        if component_dir.name == PROVENANCE_DIR:
            continue
        component_masks = masks.get(component_dir.name, {})
        for weight_file in weight_files(component_dir, allow_pickle):
            relative = weight_file.path.relative_to(sanitized)
            try:
                before = _original_state(source / component_dir.name, weight_file.path.name,
                                         allow_pickle)
            except FileNotFoundError:
                report.problems.append(f"{relative} has no counterpart in the original")
                continue
            after = read_state(weight_file.path)
            if before.keys() != after.keys():
                report.problems.append(f"{relative} holds other tensors than the original")
            for name in sorted(before.keys() & after.keys()):
                report.tensors_checked += 1
                expected = before[name]
                if name in component_masks:
                    recorded = records.get(f"{component_dir.name}/{name}", {})
                    if weight_file.primary and recorded.get("sha256_before") not in (
                            None, tensor_sha256(expected)):
                        report.problems.append(
                            f"the original's {component_dir.name}/{name} is not the tensor the "
                            "subspace was located on (sha256_before differs)")
                    expected = zero_masked(expected, component_masks[name])
                if not torch.equal(expected, after[name]):
                    what = ("is not the original with exactly the masked weights zeroed"
                            if name in component_masks else "was modified but is not masked")
                    report.problems.append(f"{relative}: {name} {what}")
    if len(report.problems) == before_count:
        report.established.append(
            f"every other file ({report.files_checked}) and tensor ({report.tensors_checked}) "
            "equals the original's, except the masked weights, which are zero")


def _compare_subspaces(report: Verification, carried: Subspace, independent: Subspace,
                       where: Path) -> None:
    differences = independent.differences(carried)
    report.problems += [f"the carried subspace differs from {where}: {d}" for d in differences]
    if not differences:
        report.established.append(f"the carried subspace equals the one in {where}")


def _check_digest(report: Verification, subspace: Subspace, expected: str) -> None:
    if report.digest is None:
        report.digest = subspace.digest()
    if report.digest != expected.strip().lower():
        report.problems.append(f"the subspace's digest is {report.digest}, not the expected "
                               f"{expected.strip()}")
    else:
        report.established.append("the subspace has the expected digest")


def verify_subspace(folder: str | Path, subspace: str | Path | None = None,
                    expect_digest: str | None = None) -> Verification:
    """Check a subspace folder: masks against the manifest's counts and hashes, and against an
    independent copy (``subspace``) or a digest noted elsewhere (``expect_digest``)."""
    loaded = Subspace.load(folder)
    report = Verification(str(folder), digest=loaded.digest(), subspace=loaded)
    _check_subspace(report, loaded)
    if subspace is not None:
        _compare_subspaces(report, loaded, Subspace.load(subspace), Path(subspace))
    if expect_digest is not None:
        _check_digest(report, loaded, expect_digest)
    if subspace is None and expect_digest is None:
        report.unconfirmed.append("the subspace itself: nothing outside its folder confirms it "
                                  "(pass --subspace or --expect-digest)")
    return report


def _carried_subspace(report: Verification, sanitized: Path) -> Subspace | None:
    folder = sanitized / PROVENANCE_DIR
    absent = [f"{PROVENANCE_DIR}/{name}" for name in (MASKS_FILE, MANIFEST_FILE)
              if not (folder / name).is_file()]
    if absent:
        report.unverified.append(f"the model carries no subspace ({', '.join(absent)} "
                                 "missing): it was not baked by memedit, or its provenance was "
                                 "removed")
        return None
    return Subspace.load(folder)


def verify_sanitized(model: str | Path, original: str | Path | None = None,
                     allow_pickle: bool = False, subspace: str | Path | None = None,
                     expect_digest: str | None = None) -> Verification:
    """Verify a sanitized model folder (see the module docstring for the verdicts).

    Checks: the carried subspace against ``subspace`` and ``expect_digest`` when given; the
    masks against the manifest's counts; every edited tensor zero where masked and equal to
    the manifest's ``sha256_after``; the UNet's other tensors against ``model.identity``; and
    the whole folder against ``original`` (default: the source recorded at bake time).
    """
    sanitized = resolve_model(model, allow_pickle).path
    report = Verification(str(sanitized))
    info = provenance(sanitized)
    if info is None:
        report.unverified.append(f"the model has no {PROVENANCE_DIR}/{PROVENANCE_FILE}: it was "
                                 "not baked by memedit, or its provenance was removed")
    carried = _carried_subspace(report, sanitized)
    reference = carried
    if carried is not None:
        report.digest = carried.digest()
    if subspace is not None:
        independent = Subspace.load(subspace)
        if carried is not None:
            _compare_subspaces(report, carried, independent, Path(subspace))
        reference = independent
    if expect_digest is not None:
        if carried is None:
            report.unverified.append("--expect-digest: there is no carried subspace to check")
        else:
            _check_digest(report, carried, expect_digest)
    if carried is not None and subspace is None and expect_digest is None:
        report.unconfirmed.append(
            "the carried subspace itself: nothing outside the model folder confirms it, and "
            "whoever can write the folder can rewrite masks and manifest together (pass "
            "--subspace or --expect-digest)")
    report.subspace = reference
    if reference is None:
        return report
    _check_subspace(report, reference)
    _check_edited(report, sanitized, reference, allow_pickle)
    _check_identity(report, sanitized, reference, allow_pickle)
    recorded = (info or {}).get("source", {}).get("path") if original is None else None
    if original is not None:
        source = resolve_model(original, allow_pickle).path
        report.original = f"{source} (--original)"
    elif recorded is not None and Path(recorded).is_dir():
        source = resolve_model(recorded, allow_pickle).path
        report.original = f"{source} (recorded at bake time)"
        report.unconfirmed.append(
            f"that {source} is the original: its path comes from the model's own "
            f"{PROVENANCE_DIR}/{PROVENANCE_FILE} (pass --original to name it yourself)")
    else:
        report.unverified.append(
            "the rest of the model against its original: "
            + (f"the original recorded at bake time ({recorded}) is gone" if recorded
               else "no original is known") + " (pass --original)")
        return report
    _compare_with_original(report, sanitized, source, reference, allow_pickle)
    return report


def inspect(path: str | Path, original: str | Path | None = None,
            subspace: str | Path | None = None, expect_digest: str | None = None,
            allow_pickle: bool = False) -> Verification:
    """What ``memedit inspect`` checks: :func:`verify_sanitized` for a pipeline folder,
    :func:`verify_subspace` otherwise (``EXIT_STATUS[result.verdict]`` is its exit status)."""
    if is_pipeline_folder(Path(path)):
        return verify_sanitized(path, original, allow_pickle, subspace, expect_digest)
    if original is not None:
        raise MemeditError(f"{path} is not a model folder: --original applies to a sanitized "
                           "model.", "Pass the sanitized model folder, or drop --original.")
    return verify_subspace(path, subspace, expect_digest)
