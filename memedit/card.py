"""The model card of a model memedit baked: what was edited, how, and with what result.

``bake`` writes ``README.md`` as a Hugging Face model card (``huggingface_hub.ModelCard``):
metadata (``base_model`` for a hub model, ``base_model_relation: finetune``, the source card's
license, tags) and a body naming the base model and its revision, the method and its
parameters, how many weights were zeroed in which layers, and the prompt sets' hashes. The
source model's own card is not passed off as the edited model's: it is kept unchanged, byte for
byte, at ``memedit/source_README.md``; baking a model memedit baked keeps the base model's
card from there, not the first edit's card.

``evaluate --update-card`` and ``attack --update-card`` put their table into the card's
Results section (:func:`update_card`): only in a folder memedit baked, only from a report of
that very folder, through the output policy (one atomic rename of ``README.md``), holding the
model folder's lock (no other update, no ``bake --overwrite`` into it meanwhile).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml  # huggingface_hub's own YAML parser: its errors are what a broken card raises
from huggingface_hub import ModelCard, ModelCardData
from tabulate import tabulate

from memedit import distributed
from memedit.artifacts import PROVENANCE_DIR, PROVENANCE_FILE
from memedit.errors import MemeditError
from memedit.families import family_of_folder
from memedit.loading import ModelSource
from memedit.outputs import atomic_write_bytes, output_lock, written_by_memedit

CARD_FILE = "README.md"
SOURCE_CARD = "memedit/source_README.md"  # the source model's card, kept unchanged
PAPER = "https://arxiv.org/abs/2406.18566"
PROJECT = "memedit"
REPORT_KINDS = {"memedit-evaluation": "evaluate", "memedit-attack": "attack"}
_RESULTS_START, _RESULTS_END = "<!-- memedit:results -->", "<!-- memedit:results:end -->"
# What ModelCard raises on a README it cannot read as a card: broken YAML, metadata of odd types
# (``tags: 5``), metadata that is no mapping, text that is not UTF-8 (a ValueError too).
_NOT_A_CARD = (yaml.YAMLError, TypeError, ValueError)
_NOT_YET = ("Not measured yet. `memedit evaluate --model THIS_FOLDER --out REPORT "
            "--update-card` (and `memedit attack ... --update-card`) put their table here.")

_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Base model

{{ base }}

## The edit

{{ edit }}

## Weights set to zero

{{ layers }}

## Prompt sets

{{ prompts }}

## Results

""" + _RESULTS_START + """
{{ results }}
""" + _RESULTS_END + """

## Check it

```
memedit inspect THIS_FOLDER --original {{ original }}
```

`inspect` checks every zeroed weight against `memedit/subspace.json` (the manifest, with each
edited tensor's sha256 before and after) and, given the base model, every other file and tensor
against it. `memedit/masks.safetensors` holds the masks themselves.
"""


def _table(rows: list[list], headers: list[str]) -> str:
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def _source_metadata(card_path: Path) -> dict:
    """License fields of the source model's card (its terms still apply to the edit)."""
    if not card_path.is_file():
        return {}
    try:
        data = ModelCard.load(card_path, ignore_metadata_errors=True).data.to_dict()
    except _NOT_A_CARD:  # a README that is not a card: no metadata to keep (it is kept as is)
        return {}
    return {key: data[key] for key in ("license", "license_name", "license_link") if key in data}


def _previous_edit(model: Path) -> dict | None:
    """The provenance record of an earlier bake, when ``model`` is a model memedit baked."""
    try:
        record = json.loads((model / PROVENANCE_DIR / PROVENANCE_FILE).read_bytes())
    except (OSError, ValueError):  # none, or unreadable: nothing known of an earlier edit
        return None
    return record if isinstance(record, dict) else None


def base_card(model: Path) -> Path:
    """Where the base model's card is in a model folder: its README.md, or for a model memedit
    baked the kept :data:`SOURCE_CARD` (its README.md is memedit's card of that edit)."""
    return model / (SOURCE_CARD if _previous_edit(model) is not None else CARD_FILE)


def _previous_edit_note(previous: dict) -> str:
    base = previous.get("source") if isinstance(previous.get("source"), dict) else {}
    name = base.get("hub_id") or base.get("spec") or "a model not recorded"
    zeroed = previous.get("zeroed")
    count = f"{zeroed:,} weights zeroed" if isinstance(zeroed, int) else "weights zeroed"
    return (f"\n\nThis model was edited twice: the model baked here had itself been baked by "
            f"memedit {previous.get('memedit_version')} from `{name}` ({count}); this card "
            "describes the second edit.")


def _base_section(source: dict, identity: dict | None, kept_card: bool,
                  previous: dict | None = None) -> str:
    if source.get("hub_id"):
        rows = [["hub id", f"[{source['hub_id']}](https://huggingface.co/{source['hub_id']})"],
                ["revision asked for", source.get("revision") or "(default branch)"],
                ["commit", source.get("commit") or "(not known: not from the hub cache)"]]
    else:
        rows = [["folder at bake time", f"`{source['path']}`"]]
        if source["spec"] != source["path"]:
            rows.insert(0, ["model, as given", f"`{source['spec']}`"])
    if source.get("variant"):
        rows.append(["weight variant", source["variant"]])
    if identity:
        rows.append(["UNet identity (sha256 over its unedited tensors)",
                     f"`{identity.get('sha256')}`"])
    card = (f"The base model's own card is kept unchanged at `{SOURCE_CARD}`; its license and "
            "terms apply to this model too." if kept_card else
            "The base model had no card (README.md).")
    note = _previous_edit_note(previous) if previous else ""
    return _table(rows, ["", ""]) + "\n\n" + card + note


def _edit_section(manifest: dict, version: str) -> str:
    method = manifest.get("method", {})
    sampling = method.get("sampling", {})
    targets = method.get("targets", {})
    rows = [["method", f"{method.get('name')} ([paper]({PAPER}))"],
            ["k (per output row: the top fraction of inputs by Wanda score)", method.get("k")],
            ["tau (the first UNet calls aggregated)", method.get("tau")],
            ["rho (kept if flagged in more than rho·tau calls; 0: any)", method.get("rho")],
            ["granularity", method.get("granularity")],
            ["target layers", "; ".join(f"{kind}: {text}" for kind, text in targets.items())],
            ["scheduler, steps, guidance scale, seed",
             f"{method.get('scheduler')}, {sampling.get('steps')}, "
             f"{sampling.get('guidance_scale')}, {sampling.get('seed')}"],
            ["located with", f"memedit {manifest.get('memedit_version')}"],
            ["baked with", f"memedit {version}"]]
    text = _table(rows, ["parameter", "value"])
    calibration = manifest.get("calibration")
    if isinstance(calibration, dict):
        from memedit.calibration import calibration_table

        text += (f"\n\nk was calibrated: the smallest k whose edit copies at most "
                 f"{calibration.get('target_rate')} of the validation prompts within a utility "
                 f"budget of {calibration.get('utility_budget')} (chosen k: "
                 f"{calibration.get('chosen_k')}).\n\n```\n{calibration_table(calibration)}\n```")
    hardening = manifest.get("hardening")
    if isinstance(hardening, dict):
        rounds = hardening.get("rounds_run", [])
        text += (f"\n\nThe edit was hardened against the embedding attack in {len(rounds)} "
                 "round(s), each adding the weights the attack leaned on: "
                 + ", ".join(f"{r.get('zeroed_before'):,} -> {r.get('zeroed_after'):,}"
                             for r in rounds) + " weights zeroed.")
    return text


def _layers_section(manifest: dict) -> str:
    rows = [[f"`{key}`", f"{entry['selected']:,}", f"{entry['total']:,}",
             f"{entry['fraction']:.4%}"] for key, entry in sorted(manifest["layers"].items())]
    total = manifest["total"]
    rows.append(["**total**", f"**{total['selected']:,}**", f"{total['total']:,}",
                 f"{total['fraction']:.4%}"])
    return _table(rows, ["layer", "zeroed", "of", "fraction"])


def _prompts_section(manifest: dict) -> str:
    rows = [[role, entry.get("name"), entry.get("count"), f"`{entry.get('sha256')}`"]
            for role, entries in manifest.get("prompts", {}).items()
            for entry in entries]
    return (_table(rows, ["role", "name", "prompts", "sha256"]) + "\n\nThe prompts themselves "
            "are not shipped; the hashes tell whoever holds them which ones were used.")


def build_card(manifest: dict, source: dict, version: str, source_metadata: dict | None = None,
               kept_card: bool = False, previous: dict | None = None) -> ModelCard:
    """The card of a baked model from its subspace manifest and where it came from.

    ``source`` is the ``source`` record of ``memedit/sanitized.json`` (spec, hub_id, path,
    revision, commit, variant); ``previous`` that file of the source, when memedit had baked it.
    """
    hub_id = source.get("hub_id")
    data = ModelCardData(
        base_model=hub_id, library_name="diffusers", pipeline_tag="text-to-image",
        tags=[PROJECT, "memorization", "diffusers", "stable-diffusion", "text-to-image"],
        **({"base_model_relation": "finetune"} if hub_id else {}),
        **(source_metadata or {}))
    total = manifest["total"]
    name = hub_id or (source["spec"] if source["spec"] != source["path"]
                      else Path(source["path"]).name)
    summary = (
        f"**{name}** with {total['selected']:,} of the {total['total']:,} weights of its "
        f"{len(manifest['layers'])} edited layers set to zero by memedit {version}: "
        "the weights the model leans on to reproduce memorized training images, located and "
        f"deleted as in Chavhan et al. (2024), [\"Memorized Images in Diffusion Models share a "
        f"Subspace that can be Located and Deleted\"]({PAPER}). Every other weight is the base "
        "model's, unchanged, and so is every other file but this card. This is an edited "
        "model, not the base model: it loads as any diffusers pipeline "
        "(`DiffusionPipeline.from_pretrained`).")
    return ModelCard.from_template(
        data, template_str=_TEMPLATE, title=f"{name}, memorization edited by memedit",
        summary=summary,
        base=_base_section(source, manifest.get("model", {}).get("identity"), kept_card,
                           previous),
        edit=_edit_section(manifest, version), layers=_layers_section(manifest),
        prompts=_prompts_section(manifest), results=_NOT_YET,
        original=(f"{hub_id} --revision {source['commit'] or source['revision']}"
                  if hub_id and (source.get("commit") or source.get("revision"))
                  else hub_id or source.get("path")))


def source_record(source: ModelSource) -> dict:
    """What the card and ``memedit/sanitized.json`` record of the model a bake read."""
    return {"spec": source.spec, "hub_id": source.hub_id, "path": str(source.path),
            "revision": source.revision, "commit": source.commit, "variant": source.variant}


def write_card(folder: Path, manifest: dict, source: ModelSource) -> Path:
    """Write the card into a baked model being assembled in ``folder`` (bake's temporary
    folder): the copied source card moves to :data:`SOURCE_CARD`, unchanged.

    A source memedit baked already holds the base model's card at :data:`SOURCE_CARD` (which
    the copy leaves out, as all of ``memedit/``) and its README.md is the first edit's card:
    the base model's card is the one kept.
    """
    from memedit import __version__

    card_path, kept = folder / CARD_FILE, folder / SOURCE_CARD
    if (base := base_card(source.path)).is_file():
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_bytes(base.read_bytes())
    card_path.unlink(missing_ok=True)  # the copy of the source's README.md
    card = build_card(manifest, source_record(source), __version__, _source_metadata(kept),
                      kept.is_file(), _previous_edit(source.path))
    card_path.write_text(str(card), encoding="utf-8")
    return card_path


def _not_updatable(folder: Path, why: str,
                   hint: str = "--update-card updates only the card of a model folder `memedit "
                               "bake` wrote; drop it, or bake the model with memedit first."
                   ) -> MemeditError:
    return MemeditError(f"memedit will not update the card of {folder}: {why}.", hint)


def _updatable_card(folder: Path) -> tuple[str, int, int]:
    """The text of ``folder``'s card and where its Results block's markers are; refuses a card
    that cannot be updated as it is (the user's to fix: memedit does not guess)."""
    card = folder / CARD_FILE
    fix = (f"Fix {CARD_FILE} (or bake the model again), or drop --update-card and paste the "
           "run's table.txt into the card yourself.")
    try:
        text = card.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise _not_updatable(folder, f"it has no {CARD_FILE}") from None
    except UnicodeDecodeError as err:
        raise _not_updatable(folder, f"its {CARD_FILE} is not UTF-8 text ({err})", fix) from None
    if _RESULTS_START not in text:
        raise _not_updatable(folder, f"its {CARD_FILE} is not the card memedit wrote")
    try:
        ModelCard(text)
    except _NOT_A_CARD as err:
        raise _not_updatable(folder, f"the metadata of its {CARD_FILE} do not parse "
                                     f"({type(err).__name__}: {err})", fix) from None
    counts = text.count(_RESULTS_START), text.count(_RESULTS_END)
    start, end = text.find(_RESULTS_START), text.find(_RESULTS_END)
    if counts != (1, 1) or start > end:
        order = ", in the wrong order" if counts == (1, 1) else ""
        raise _not_updatable(folder, f"its {CARD_FILE} must hold `{_RESULTS_START}` and then "
                                     f"`{_RESULTS_END}`, once each (it holds them {counts[0]} "
                                     f"and {counts[1]} times{order})", fix)
    return text, start, end


def check_card_updatable(model: str | os.PathLike | None) -> Path:
    """Refuse, before any work, a model whose card memedit may not rewrite; returns its folder.

    Only a folder memedit baked (its marker says ``sanitized-model``) whose README.md is still
    memedit's card, and one it can update (UTF-8, metadata that parse, the Results markers once
    each and in order): the model folder is the user's, and anything else in it is theirs.
    """
    if model is None:
        raise _not_updatable(Path("the embedded test model"), "it is memedit's own test model, "
                                                               "not a model memedit baked")
    folder = Path(os.fspath(model)).expanduser()
    if not folder.is_dir():
        raise _not_updatable(folder, "it is not a local folder")
    folder = folder.resolve()
    marker = written_by_memedit(folder)
    if marker is None or marker.get("kind") != "sanitized-model":
        raise _not_updatable(folder, "memedit did not bake it (no sanitized-model marker)")
    _updatable_card(folder)
    return folder


def _results_block(kind: str, report: dict, table: str) -> str:
    sets = report.get("prompt_sets", {})
    rows = [[role, entry.get("name"), entry.get("count"), f"`{entry.get('sha256')}`"]
            for role, entry in sets.items() if isinstance(entry, dict)]
    prompts = ("\n\n" + _table(rows, ["role", "name", "prompts", "sha256"])) if rows else ""
    return (f"<!-- memedit:{kind} -->\n### memedit {kind}\n\n"
            f"memedit {report.get('memedit_version')}, {report.get('created', '')}; the full "
            f"report is the `report.json` that run wrote.{prompts}\n\n```\n{table.rstrip()}\n```\n"
            f"<!-- memedit:{kind}:end -->")


def _read_report(report_dir: Path) -> tuple[str, dict, str]:
    try:
        report = json.loads((report_dir / "report.json").read_text())
        table = (report_dir / "table.txt").read_text()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MemeditError(f"{report_dir} holds no readable report.json and table.txt ({err}).",
                           "Pass the --out folder of `memedit evaluate` or `memedit attack`."
                           ) from None
    kind = REPORT_KINDS.get(report.get("format")) if isinstance(report, dict) else None
    if kind is None:
        raise MemeditError(f"{report_dir}/report.json is not a memedit evaluate or attack "
                           "report.", "Pass the --out folder of `memedit evaluate` or attack.")
    return kind, report, table


def update_card(model: str | os.PathLike, report_dir: str | os.PathLike) -> Path | None:
    """Put the table of an ``evaluate`` or ``attack`` run of ``model`` (its ``--out`` folder
    ``report_dir``) into the model's card; a later run of the same kind replaces it.

    Returns the card's path; None on the processes of a launched run other than the main one,
    which write nothing (the main one updates the card once).
    """
    if not distributed.state().is_main:
        return None
    folder = check_card_updatable(model)
    kind, report, table = _read_report(Path(report_dir))
    measured = (report.get("context") or {}).get("model")
    if measured is None or Path(measured).expanduser().resolve() != folder:
        raise MemeditError(f"{report_dir} reports on {measured}, not on {folder}.",
                           "Update a model's card only with a report of that model.")
    block = _results_block(kind, report, table)
    own = re.compile(rf"<!-- memedit:{kind} -->.*?<!-- memedit:{kind}:end -->", re.DOTALL)
    # Read, modify and write under the folder's lock: another --update-card (whose block would
    # be lost) or a `bake --overwrite` into the folder is refused meanwhile.
    with output_lock(folder):
        text, start, end = _updatable_card(folder)  # again: the card may have changed since
        results = text[start + len(_RESULTS_START):end].strip()
        if own.search(results):
            results = own.sub(lambda _: block, results)
        elif results == _NOT_YET:
            results = block
        else:
            results = f"{results}\n\n{block}"
        text = f"{text[:start]}{_RESULTS_START}\n{results}\n{text[end:]}"
        return atomic_write_bytes(folder / CARD_FILE, text.encode("utf-8"), overwrite=True)


def _export_intro(model: Path) -> str:
    if _previous_edit(model) is None:
        return "memedit did not edit this model, only exported it."
    return ("memedit edited this model (see its `memedit/` folder), but its card does not parse "
            "as one, so this card does not repeat it.")


def write_export_card(folder: Path, source: ModelSource, verdict: str, report: str) -> Path:
    """The card of an ONNX export being assembled in ``folder`` (export's temporary folder).

    A model memedit baked lends its card, with an "ONNX export" section (verdict and report of
    the export's audit and parity) after the title; any other model gets a short card that
    says memedit only exported it, its own card kept unchanged at :data:`SOURCE_CARD`.
    """
    from memedit import __version__

    own = source.path / CARD_FILE
    text = own.read_text(encoding="utf-8", errors="replace") if own.is_file() else ""
    ort_class = family_of_folder(source.path).ort_pipeline_class  # SDXL's is another class
    section = (f"## ONNX export\n\nThis folder is the ONNX export (Optimum's layout; loads "
               f"with `optimum.onnxruntime.{ort_class}`) of "
               f"`{source.hub_id or source.spec}`, written by memedit {__version__}. Audit and "
               f"parity: **{verdict}**.\n\n```\n{report.rstrip()}\n```\n")
    try:
        card = ModelCard(text) if _RESULTS_START in text else None
    except _NOT_A_CARD:  # memedit's card, broken since: exported as any other model's README
        card = None
    if card is not None:
        card.data.tags = [*(card.data.tags or []), "onnx"]
        body = card.text.lstrip("\n")
        cut = body.find("\n## ")
        card.text = ("\n" + body + "\n\n" + section if cut < 0
                     else f"\n{body[:cut]}\n\n{section}{body[cut:]}")
    else:
        if own.is_file():
            (folder / SOURCE_CARD).parent.mkdir(parents=True, exist_ok=True)
            (folder / SOURCE_CARD).write_bytes(own.read_bytes())
        data = ModelCardData(base_model=source.hub_id, tags=[PROJECT, "onnx", "text-to-image"],
                             pipeline_tag="text-to-image", **_source_metadata(own))
        kept = (f"Its own card is kept unchanged at `{SOURCE_CARD}`." if own.is_file()
                else "It had no card.")
        card = ModelCard.from_template(
            data, template_str="---\n{{ card_data }}\n---\n\n# {{ title }}\n\n{{ body }}\n",
            title=f"{source.hub_id or source.spec}, exported to ONNX",
            body=f"{_export_intro(source.path)} {kept}\n\n{section}")
    path = folder / CARD_FILE
    path.write_text(str(card), encoding="utf-8")
    return path
