"""The Python API: export a pipeline to ONNX and prove it (parity + sanitization audit).

``export_onnx`` writes the folder atomically: export, ``onnx.checker``, audit and parity all
run on a temporary sibling, and only a folder that passed is moved into place. A sanitized
export that fails the audit, or any export that fails parity, leaves nothing behind and raises
:class:`VerificationFailed`, which carries the full report.

The audit trusts the PyTorch model as its reference only once each masked tensor, as stored,
hashes to the subspace's ``sha256_after`` and the masks match the manifest's counts. A report's
verdict is PASSED, FAILED, or NOT VERIFIABLE: nothing failed, but what the checks rest on (the
export's record or stored subspace, the manifest's hashes) is missing.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from memedit.errors import MemeditError
from memedit.hub import HubPush, check_push, push_output
from memedit.subspace import MANIFEST_FILE, Subspace
from memedit.weights import read_tensors, tensor_sha256

from .audit import AuditReport, audit_export
from .onnx import (
    EXPORT_RECORD,
    PROVENANCE_DIR,
    ExportInfo,
    ExportOptions,
    export_device,
    export_pipeline,
    read_record,
    write_record,
)
from .optimize import cuda_only_ops, needs_cuda
from .parity import (
    DTYPE_THRESHOLDS,
    Case,
    ParityInputs,
    ParityReport,
    Thresholds,
    default_thresholds,
    ort_parity,
    torch_references,
)
from .runtime import CUDA, choose_provider, load_ort_pipeline, ort_failures

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline


PASSED, FAILED, NOT_VERIFIABLE = "PASSED", "FAILED", "NOT VERIFIABLE"
# What each failing audit status means, for the one-line error under the report.
_STATUS_MEANING = {
    "nonzero-in-onnx": "a zeroed weight is not zero in the ONNX graph",
    "nonzero-in-source": "the PyTorch model is not sanitized with this subspace",
    "source-not-as-baked": "the PyTorch tensor is not the one the manifest records after "
                           "baking (sha256_after differs)",
    "not-found": "no ONNX initializer holds this weight (another graph, or fused weights)",
}


@dataclass
class VerifyReport:
    """Everything checked about one ONNX folder, and what could not be established."""

    onnx_dir: str
    source: str
    parity: ParityReport | None = None
    audit: AuditReport | None = None
    audit_note: str = ""
    export: ExportInfo | None = None
    provider_reason: str = ""
    unverified: list[str] = field(default_factory=list)  # missing inputs: NOT VERIFIABLE
    unconfirmed: list[str] = field(default_factory=list)  # passed, resting on the folder only

    @property
    def passed(self) -> bool:
        parity_ok = self.parity is None or self.parity.passed
        audit_ok = self.audit is None or self.audit.passed
        return parity_ok and audit_ok

    @property
    def not_established(self) -> list[str]:
        """What blocks a PASSED verdict although nothing failed."""
        return self.unverified + (self.audit.unverified if self.audit else [])

    @property
    def verdict(self) -> str:
        if not self.passed:
            return FAILED
        return NOT_VERIFIABLE if self.not_established else PASSED

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "verdict": self.verdict,
            "onnx_dir": self.onnx_dir,
            "source": self.source,
            "export": None if self.export is None else self.export.to_dict(),
            "provider_reason": self.provider_reason,
            "audit": None if self.audit is None else self.audit.to_dict(),
            "audit_note": self.audit_note,
            "parity": None if self.parity is None else self.parity.to_dict(),
            "not_established": self.unverified + self.unconfirmed,
        }

    def table(self) -> str:
        """A readable, multi-section report."""
        lines = [f"ONNX folder: {self.onnx_dir}", f"PyTorch reference: {self.source}"]
        if self.export is not None:
            e = self.export
            sizes = ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in e.files.items())
            lines += [f"Export: {e.seconds:.1f} s (optimization {e.optimize_seconds:.1f} s, "
                      f"onnx.checker {e.checker_seconds:.1f} s), "
                      f"opset {e.opset or 'Optimum default'}, {e.dtype}, optimize {e.optimize}, "
                      f"quantize {e.quantize}, dynamic batch/sequence/image axes",
                      f"Files: {sizes}", f"Optimum validation: {e.optimum_validation}"]
            lines += [f"  {step['component']}: " + ", ".join(
                f"{k} {v}" for k, v in step.items() if k not in ("component", "seconds"))
                for step in e.steps]
        if self.provider_reason:
            lines.append(f"Provider: {self.provider_reason}")
        lines.append("")
        lines.append(self.audit.table() if self.audit else f"Sanitization audit: {self.audit_note}")
        if self.parity is not None:
            lines += ["", self.parity.table()]
        if self.unverified or self.unconfirmed:
            lines += ["", "Not established:"]
            lines += [f"  - {item}" for item in self.unverified + self.unconfirmed]
        lines += ["", f"RESULT: {self.verdict}"]
        return "\n".join(lines)


class VerificationFailed(MemeditError):
    """Parity or the sanitization audit failed; ``report`` says where."""

    def __init__(self, report: VerifyReport, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.report = report


def load_subspace(path: str | os.PathLike | None) -> Subspace | None:
    """``Subspace.load`` on a subspace folder or a model folder carrying ``memedit/``, or None."""
    if path is None:
        return None
    path = Path(path)
    if (path / PROVENANCE_DIR / MANIFEST_FILE).is_file() or (path / MANIFEST_FILE).is_file():
        return Subspace.load(path)
    return None


def _baked(subspace: Subspace, source_dir: Path, allow_pickle: bool) -> dict[str, bool | None]:
    """Per masked key: does the source tensor, as stored, hash to the manifest's
    ``sha256_after``? (None: the manifest records none.) Only then is the loaded PyTorch
    parameter a trustworthy reference for the audit."""
    records, missing = subspace.tensor_records(), set(subspace.missing_hashes())
    stored = read_tensors(source_dir, list(subspace.masks), allow_pickle)
    return {key: None if key in missing else (
                key in stored and tensor_sha256(stored[key]) == records[key]["sha256_after"])
            for key in subspace.masks}


def _audit(pipe: DiffusionPipeline, onnx_dir: Path, subspace: Subspace,
           source_dir: Path | None, allow_pickle: bool) -> AuditReport:
    """The audit of ``onnx_dir`` against ``subspace``, tied to the manifest's records: the
    masks' counts, and the source tensors' sha256 after baking (``source_dir``'s files)."""
    problems, gaps = subspace.check_manifest()
    baked = None if source_dir is None else _baked(subspace, source_dir, allow_pickle)
    audit = audit_export(subspace.masks, pipe, onnx_dir, baked=baked)
    audit.problems += problems
    audit.unverified += gaps
    if source_dir is None:
        audit.unverified.append("the PyTorch pipeline was given in memory: its tensors are not "
                                "checked against the manifest's sha256_after")
    return audit


def _torch_phase(pipe: DiffusionPipeline, report: VerifyReport, inputs: ParityInputs,
                 parity: bool, full_pipeline: bool) -> tuple[list[Case] | None, float]:
    """The parity references, which need the PyTorch pipeline; skipped when the audit (run
    first: it is cheap) already failed, which makes parity moot."""
    if not (parity and report.passed):
        return None, 0.0
    start = time.perf_counter()
    cases = torch_references(pipe, inputs, full_pipeline)
    return cases, time.perf_counter() - start


def _ort_phase(report: VerifyReport, cases: list[Case] | None, torch_seconds: float,
               onnx_dir: Path, thresholds: Thresholds, provider: str,
               threads: int | None) -> VerifyReport:
    """Run the parity cases with Optimum's ORT pipeline (after PyTorch was freed).

    A graph with CUDA-only fused operators is checked on CUDA; where there is none, parity
    is not established (NOT VERIFIABLE), which the report says, and the audit still holds."""
    if cases is None:
        return report
    cuda_only = cuda_only_ops(onnx_dir)
    if cuda_only and provider != "cpu" and choose_provider("auto").provider != CUDA:
        report.unverified.append(
            "parity: the graphs use CUDA-only fused operators ("
            + "; ".join(f"{c}: {', '.join(ops)}" for c, ops in cuda_only.items())
            + ") and this machine has no working CUDA provider to run them")
        return report
    ort_pipe, choice = load_ort_pipeline(onnx_dir, provider, threads)
    report.provider_reason = f"{choice.label} ({choice.reason})"
    with ort_failures(onnx_dir):
        report.parity = ort_parity(ort_pipe, cases, thresholds, choice.provider, torch_seconds)
    return report


def verify_loaded(pipe: DiffusionPipeline, onnx_dir: Path,
                  masks: dict[str, torch.Tensor] | None = None,
                  thresholds: Thresholds | None = None,
                  inputs: ParityInputs | None = None, parity: bool = True,
                  full_pipeline: bool = True, provider: str = "cpu", threads: int | None = None,
                  source: str = "", audit_note: str = "") -> VerifyReport:
    """Audit (if ``masks``) and parity of ``onnx_dir`` against the loaded PyTorch ``pipe``.

    No manifest comes with bare masks, so the audit cannot tie ``pipe`` to recorded hashes:
    the report says so (NOT VERIFIABLE at best).
    """
    onnx_dir = Path(onnx_dir)
    report = VerifyReport(str(onnx_dir), source, audit_note=audit_note)
    if masks:
        report.audit = _audit(pipe, onnx_dir, Subspace(masks, {}), None, False)
    cases, spent = _torch_phase(pipe, report, inputs or ParityInputs(), parity, full_pipeline)
    return _ort_phase(report, cases, spent, onnx_dir, thresholds or Thresholds(), provider,
                      threads)


def _parity_provider(options: ExportOptions, parity: bool) -> str:
    """The provider parity runs on; refuses, before anything is written, a graph that only
    CUDA can run when parity is asked for and there is no CUDA."""
    reason = needs_cuda(options.components)
    if reason is None:
        return "auto" if options.dtype == "bf16" else "cpu"
    if parity:
        try:
            choose_provider("cuda")
        except MemeditError as err:
            raise MemeditError(
                f"Parity cannot be checked here: {reason}, and {err.message[0].lower()}"
                f"{err.message[1:]}",
                "Export with --optimize basic (CPU-runnable fusions), export on a GPU "
                "machine, or pass --no-parity: the audit still runs and the export is written "
                "with the verdict NOT VERIFIABLE (exit status 3).") from None
    return "cuda"


def failure(report: VerifyReport) -> VerificationFailed:
    """The error that explains why ``report`` failed (audit first, then parity)."""
    if report.audit is not None and not report.audit.passed:
        bad = [f"{r.key}: {_STATUS_MEANING.get(r.status, r.status)}"
               for r in report.audit.results if not r.passed] + report.audit.problems
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return VerificationFailed(
            report, f"Sanitization audit failed: {bad[0]}{more}.",
            "Check that the model was baked with this subspace (`memedit bake`) and that "
            "neither folder was edited since; export without graph optimizations that fuse "
            "weights.")
    return VerificationFailed(
        report, "ONNX Runtime does not reproduce the PyTorch model within the thresholds.",
        "See the table; loosen --max-abs/--mean-abs/--min-psnr only if the differences are "
        "expected (e.g. fp16).")


def export_onnx(model: str | os.PathLike | None, out: str | os.PathLike,
                options: ExportOptions | None = None, overwrite: bool = False,
                subspace: str | os.PathLike | None = None, parity: bool = True,
                thresholds: Thresholds | None = None, inputs: ParityInputs | None = None,
                threads: int | None = None, allow_pickle: bool = False,
                push_to_hub: HubPush | None = None) -> VerifyReport:
    """Export ``model`` to ``out`` with Optimum, then audit and check parity; with
    ``push_to_hub``, upload the folder when its verdict is PASSED (checked before any work).

    The subspace to audit is ``subspace`` if given, else the one a memedit-baked model
    carries in ``memedit/``; a model without one is exported without an audit (said so in the
    report). Raises :class:`VerificationFailed` (nothing written) when a check fails; a
    subspace whose manifest lacks the records to tie the audit to is exported, with a report
    whose verdict is NOT VERIFIABLE.
    """
    from memedit.card import write_export_card
    from memedit.loading import load_pipeline, resolve_model
    from memedit.outputs import atomic_output_dir, check_output

    options = options or ExportOptions()
    if push_to_hub is not None:
        check_push(push_to_hub)
    source = resolve_model(model, allow_pickle)
    check_output(out, overwrite, [source.path, subspace])  # fail before the slow part
    provider = _parity_provider(options, parity)
    explicit = load_subspace(subspace) if subspace is not None else None
    if subspace is not None and explicit is None:
        raise MemeditError(f"{subspace} holds no memedit subspace.",
                           "Pass the folder written by `memedit locate`, or a baked model.")
    carried = explicit or load_subspace(source.path)
    note = "" if carried else ("not run: the model carries no memedit subspace (not sanitized "
                               "by memedit); pass --subspace DIR to audit against one")
    dtype = "bfloat16" if options.dtype == "bf16" else "float32"

    pipe, _ = load_pipeline(source, export_device(options), dtype, allow_pickle)
    with atomic_output_dir(out, overwrite, [source.path, subspace], "onnx-export") as tmp:
        info = export_pipeline(pipe, tmp, options)
        if carried is not None:
            carried.write_into(tmp / PROVENANCE_DIR)  # so that verify-onnx can audit later
        report = VerifyReport(str(tmp), str(source.path), audit_note=note)
        if carried is not None:
            report.audit = _audit(pipe, tmp, carried, source.path, allow_pickle)
        cases, spent = _torch_phase(pipe, report, inputs or ParityInputs(), parity, True)
        del pipe  # free PyTorch before ONNX Runtime loads (the full SD pipeline needs it)
        gc.collect()
        _ort_phase(report, cases, spent, tmp,
                   thresholds or default_thresholds(options.dtype, options.quantize),
                   provider, threads)
        if not parity and needs_cuda(options.components):
            report.unverified.append("parity: not run (--no-parity), and this graph needs "
                                     "CUDA to run")
        report.export = info
        report.onnx_dir = str(Path(out).expanduser().resolve())
        if not report.passed:
            raise failure(report)
        write_export_card(tmp, source, report.verdict, report.table())  # README.md
        write_record(tmp, {"source": {"spec": source.spec, "path": str(source.path),
                                      "hub_id": source.hub_id},
                           "subspace": str(subspace) if subspace else (
                               "carried by the model" if carried else None)}
                     | {"report": report.to_dict()})
    if report.verdict == "PASSED":
        push_output(out, push_to_hub)
    elif push_to_hub is not None:
        logging.getLogger("memedit").warning(
            "%s was not pushed to %s: its verdict is %s.", out, push_to_hub.repo_id,
            report.verdict)
    return report


def _recorded_thresholds(record: dict) -> Thresholds:
    """The default limits for the precision the export record says the graphs hold."""
    report = record.get("report") if isinstance(record.get("report"), dict) else {}
    export = report.get("export") if isinstance(report.get("export"), dict) else {}
    dtype, quantize = export.get("dtype", "fp32"), export.get("quantize", "none")
    if dtype not in DTYPE_THRESHOLDS or quantize not in ("none", *DTYPE_THRESHOLDS):
        return Thresholds()
    return default_thresholds(dtype, quantize)


def _export_record(onnx_dir: Path, report_gaps: list[str]) -> dict:
    """The export record, or ``{}`` (noted in ``report_gaps``) when missing or unreadable."""
    where = f"{PROVENANCE_DIR}/{EXPORT_RECORD}"
    try:
        record = read_record(onnx_dir)
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or not record:
        report_gaps.append(f"what the export checked: its record ({where}) is "
                           + ("missing" if record == {} else "unreadable"))
        return {}
    return record


def verify_onnx(onnx_dir: str | os.PathLike, model: str | os.PathLike | None = None,
                subspace: str | os.PathLike | None = None, thresholds: Thresholds | None = None,
                inputs: ParityInputs | None = None, parity: bool = True,
                provider: str = "auto", threads: int | None = None,
                allow_pickle: bool = False) -> VerifyReport:
    """Re-check an exported folder against its PyTorch model (parity and audit).

    ``model`` defaults to the source recorded at export; the subspace to ``subspace`` (which
    the copy the export stored must then equal), else that stored copy, else the one the
    model carries. The audit is tied to the subspace's manifest (counts, ``sha256_after`` of
    the source tensors). The verdict is NOT VERIFIABLE when nothing failed but the export's
    provenance (record, stored subspace) or the manifest's records are missing.
    """
    from memedit.loading import load_pipeline

    onnx_dir = Path(onnx_dir).expanduser().resolve()
    if not (onnx_dir / "model_index.json").is_file():
        raise MemeditError(f"{onnx_dir} is not an ONNX pipeline folder.",
                           "Pass the folder written by `memedit export --onnx`.")
    gaps: list[str] = []
    unconfirmed: list[str] = []
    record = _export_record(onnx_dir, gaps)
    recorded_source = record.get("source")
    if model is None:
        model = recorded_source.get("path") if isinstance(recorded_source, dict) else None
        if model is None:
            raise MemeditError(f"{onnx_dir} does not record its PyTorch source model.",
                               "Pass --model with the pipeline folder that was exported.")
        unconfirmed.append(f"that {model} is the exported model: its path comes from the "
                           "export record (pass --model to name it yourself)")
    pipe, source = load_pipeline(model, "cpu", "float32", allow_pickle)
    explicit = load_subspace(subspace) if subspace is not None else None
    if subspace is not None and explicit is None:
        raise MemeditError(f"{subspace} holds no memedit subspace.",
                           "Pass the folder written by `memedit locate`, or a baked model.")
    stored = load_subspace(onnx_dir)
    chosen = explicit or stored or load_subspace(source.path)
    if stored is None and record.get("subspace"):
        gaps.append(f"the subspace the export stored in {PROVENANCE_DIR}/ is missing, though "
                    "its record names one (provenance removed?)")
    if chosen is None:
        gaps.append("the sanitization: there is no subspace to audit against (the export "
                    "stored none and the model carries none; pass --subspace)")
    elif explicit is None:
        unconfirmed.append("the subspace audited against: nothing outside the folders "
                           "confirms it (pass --subspace with a copy kept elsewhere)")
    note = "" if chosen else "not run: no subspace found (pass --subspace DIR)"
    report = VerifyReport(str(onnx_dir), str(source.path), audit_note=note, unverified=gaps,
                          unconfirmed=unconfirmed)
    if chosen is not None:
        report.audit = _audit(pipe, onnx_dir, chosen, source.path, allow_pickle)
        if explicit is not None and stored is not None:
            report.audit.problems += [f"the subspace the export stored differs from "
                                      f"{subspace}: {d}" for d in explicit.differences(stored)]
    cases, spent = _torch_phase(pipe, report, inputs or ParityInputs(), parity, True)
    del pipe  # free PyTorch before ONNX Runtime loads
    gc.collect()
    return _ort_phase(report, cases, spent, onnx_dir,
                      thresholds or _recorded_thresholds(record), provider,
                      threads)
