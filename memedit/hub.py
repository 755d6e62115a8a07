"""The Hugging Face hub: which revision, variant and token a model is downloaded with, and
pushing a folder memedit wrote (a baked model, an ONNX export) to a hub repository.

Downloads go through diffusers' own ``DiffusionPipeline.download`` (see
:func:`memedit.loading.resolve_model`); pushes through ``huggingface_hub.HfApi``
(``create_repo(exist_ok=True)`` then ``upload_folder``). A push is checked before the long work
(offline, no token, a malformed repository id are refused then) and runs only once the output
is complete: ``bake`` and ``export`` return normally only for an output that passed their checks.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import click

from memedit.errors import MemeditError
from memedit.outputs import output_lock, written_by_memedit


@dataclass(frozen=True)
class HubPush:
    """Where to push: a repository id (``user/name``), its visibility, and the token."""

    repo_id: str
    private: bool = False
    token: str | None = field(default=None, repr=False)


def check_push(push: HubPush) -> str:
    """Refuse a push that cannot succeed, before any work; returns the token to push with.

    Checks only what is known here without the network: ``HF_HUB_OFFLINE``, the repository
    id's form, and a token (``push.token``, else ``HF_TOKEN`` or ``huggingface-cli login``'s).
    """
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from memedit.distributed import launched

    if launched():
        raise MemeditError(
            "--push-to-hub under a launcher of several processes: the others would wait on "
            "the upload past their timeout.",
            "Push the output afterwards: memedit.hub.push_folder, or "
            "`huggingface-cli upload REPO FOLDER`.")
    if constants.HF_HUB_OFFLINE:
        raise MemeditError(f"--push-to-hub {push.repo_id}: HF_HUB_OFFLINE is set, so nothing "
                           "can be pushed; nothing was written.",
                           "Unset HF_HUB_OFFLINE to push, or drop --push-to-hub and upload the "
                           "folder later (`huggingface-cli upload`).")
    try:
        validate_repo_id(push.repo_id)
    except HFValidationError as err:
        raise MemeditError(f"--push-to-hub {push.repo_id!r} is not a hub repository id ({err}).",
                           "Pass user/name or org/name.") from None
    if "/" not in push.repo_id:
        raise MemeditError(f"--push-to-hub {push.repo_id!r} names no owner.",
                           "Pass user/name or org/name.")
    token = push.token or get_token()
    if not token:
        raise MemeditError(f"--push-to-hub {push.repo_id}: no Hugging Face token; nothing was "
                           "written.",
                           "Pass --token, set HF_TOKEN, or run `huggingface-cli login` first.")
    return token


def push_folder(folder: str | os.PathLike, push: HubPush) -> str:
    """Upload ``folder`` (a complete output memedit wrote) to ``push.repo_id``; returns its URL.

    The repository is created if it does not exist (private if asked); an existing one gets a
    new commit with the folder's files. The folder's lock is held during the upload: no
    ``--overwrite`` run or ``--update-card`` changes it meanwhile. A failure of the hub (HTTP,
    network: OSErrors, as a failure to write would be) is told as what it is, the folder
    being complete.
    """
    from huggingface_hub import HfApi

    token = check_push(push)
    folder = Path(folder).expanduser().resolve()  # the lock's path, as the writers take it
    with output_lock(folder):
        if written_by_memedit(folder) is None:
            raise MemeditError(f"{folder} was not written by memedit (it has no marker); "
                               "memedit pushes only its own complete outputs.",
                               "Push it yourself with `huggingface-cli upload` if you mean to.")
        try:
            api = HfApi(token=token)
            url = api.create_repo(push.repo_id, private=push.private, exist_ok=True,
                                  repo_type="model")
            api.upload_folder(repo_id=push.repo_id, folder_path=folder, repo_type="model",
                              commit_message="Upload a model written by memedit",
                              ignore_patterns=[".memedit-*"])  # the output marker is local
        except (OSError, ValueError) as err:  # HfHubHTTPError, requests' errors are OSErrors
            raise MemeditError(
                f"{folder} was written and checked; pushing it to {push.repo_id} failed: "
                f"{type(err).__name__}: {err}",
                f"Check the network and the token's write access, then retry with "
                f"`huggingface-cli upload {push.repo_id} {folder} . --exclude '.memedit-*'` "
                f"(add --private for a new private repository).") from None
    return str(url)


def push_output(folder: str | os.PathLike, push: HubPush | None) -> str | None:
    """After a command's API call wrote and checked ``folder``: push it when asked (see
    :func:`push_folder`), say where it went, and return the URL (None when not asked)."""
    if push is None:
        return None
    url = push_folder(folder, push)
    logging.getLogger("memedit").info("Pushed %s to %s", folder, url)
    return url


# --------------------------------------------------------------------- command-line options


def model_hub_options(param: str = "model"):
    """``--revision``, ``--variant``, ``--token`` for the model a command reads (``param``).

    When any is given, the model is resolved once, here, into a
    :class:`memedit.loading.ModelSource` that carries them; the command passes it on wherever
    it passed the model (``resolve_model`` and ``load_pipeline`` take it as it is).
    """
    def decorate(func):
        @click.option("--revision", default=None, metavar="REV",
                      help="Hub branch, tag or commit of a hub model (hub ids only).")
        @click.option("--variant", default=None, metavar="NAME",
                      help="Load the model's NAME weight files (e.g. fp16: "
                           "*.fp16.safetensors), from the hub or a local folder.")
        @click.option("--token", default=None, metavar="TOKEN",
                      help="Hugging Face token for a gated or private hub model (and for "
                           "--push-to-hub). Default: HF_TOKEN or `huggingface-cli login`.")
        @functools.wraps(func)
        def wrapper(*args, revision: str | None, variant: str | None, token: str | None,
                    **kwargs):
            if revision or variant or token:
                from memedit.loading import resolve_model  # torch: not for `memedit --help`

                kwargs[param] = resolve_model(kwargs.get(param), kwargs.get("allow_pickle", False),
                                              revision, variant, token)
            return func(*args, **kwargs)

        return wrapper

    return decorate


def push_options(model_param: str = "model"):
    """``--push-to-hub REPO`` and ``--private``, checked before the command runs and passed
    to it as ``push_to_hub`` (a :class:`HubPush`), which its API call pushes with once the
    output is written and checked. Put it above :func:`model_hub_options`: it shares that
    ``--token``, which a local model does not take for itself."""
    def decorate(func):
        @click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO",
                      help="Then upload the output to this hub repository (created if "
                           "missing). Checked first: refused offline or without a token.")
        @click.option("--private", is_flag=True,
                      help="With --push-to-hub: create the repository private.")
        @functools.wraps(func)
        def wrapper(*args, push_to_hub: str | None, private: bool, **kwargs):
            if push_to_hub is None:
                if private:
                    raise MemeditError("--private applies to --push-to-hub, which is not given.",
                                       "Add --push-to-hub REPO, or drop --private.")
                return func(*args, push_to_hub=None, **kwargs)
            push = HubPush(push_to_hub, private, kwargs.get("token"))
            check_push(push)  # before the model is resolved (a hub model downloads)
            model = kwargs.get(model_param)
            if model is None or Path(os.fspath(model)).expanduser().exists():
                kwargs["token"] = None  # the push's token; a local model needs none
            return func(*args, push_to_hub=push, **kwargs)

        return wrapper

    return decorate
