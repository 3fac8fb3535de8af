"""`ft-prog download REPO_ID`: fetch a model (or dataset) repository from the Hugging Face Hub."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .run_guard import RunError

# Meta's original consolidated checkpoints duplicate the safetensors weights (and are pickles).
DEFAULT_EXCLUDE = ("original/*.pth", "original/**/*.pth")


def download(repo_id: str, *, output_dir: str | os.PathLike | None = None, include: Sequence[str] = (),
             exclude: Sequence[str] = DEFAULT_EXCLUDE, revision: str | None = None,
             repo_type: str = "model") -> Path:
    """Download ``repo_id`` with ``huggingface_hub.snapshot_download``; returns the local folder.

    The token comes from ``HF_TOKEN`` (or a prior ``hf auth login``). Files are
    cached by huggingface_hub; with ``output_dir`` they are placed there too.
    ``include`` / ``exclude`` are glob patterns over paths in the repository.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        folder = snapshot_download(
            repo_id, repo_type=repo_type, revision=revision, local_dir=output_dir,
            allow_patterns=list(include) or None, ignore_patterns=list(exclude) or None,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except GatedRepoError as e:
        raise RunError(f"{repo_id} is gated: accept its licence on the Hub and set HF_TOKEN ({e})") from None
    except RepositoryNotFoundError:
        raise RunError(f"no {repo_type} repository {repo_id!r} on the Hub (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise RunError(f"{repo_id} has no revision {revision!r}") from None
    return Path(folder)
