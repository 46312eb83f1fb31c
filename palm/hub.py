"""Talking to the Hugging Face Hub: downloads into huggingface_hub's cache, uploads, one-line errors."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from palm.errors import PalmError


REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name
LOCAL_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".jsonl", ".parquet", ".txt", ".csv", ".py", ".yaml")


def looks_local(source: str) -> bool:
    """Whether a source that does not exist was meant as a local path rather than a Hub repo id
    (`owner/name`): it starts with `.`, `/` or `~`, has more than one `/`, a file suffix, or a
    first part that exists here (`runs/tiny-typo` when runs/ exists)."""
    source = str(source)
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1:
        return True
    return Path(source).suffix in LOCAL_SUFFIXES or ("/" in source and Path(source.split("/")[0]).exists())


def check_exists_or_remote(source: str) -> None:
    """A missing local path is reported as such at once, without asking the Hub."""
    if not Path(source).exists() and looks_local(source):
        raise PalmError(f"{source}: no such file or directory")


@contextlib.contextmanager
def _hub_errors(action: str, hint: str = ""):
    from huggingface_hub.utils import logging as hub_logging

    # huggingface_hub logs every retry on stderr; the user gets our one-line error instead.
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    except Exception as e:  # network, auth, missing repo or file: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PalmError(f"could not {action} ({reason}){hint}") from None
    finally:
        hub_logging.set_verbosity(verbosity)


def hub_download(repo_id: str, filename: str) -> Path:
    """Download one file of a Hub repo into the huggingface_hub cache (or find it there)."""
    from huggingface_hub import hf_hub_download

    hint = "; if this machine is offline, download the file elsewhere and pass its local path instead"
    with _hub_errors(f"get {filename} from the Hugging Face Hub repo {repo_id}", hint):
        return Path(hf_hub_download(repo_id, filename))


def upload_folder(folder: Path, repo_id: str, repo_type: str = "model") -> None:
    """Create `repo_id` on the Hub if needed (private=False) and upload `folder` to it as one commit."""
    from huggingface_hub import HfApi

    with _hub_errors(f"upload to the Hugging Face Hub repo {repo_id}", "; log in with `hf auth login`"):
        api = HfApi()
        api.create_repo(repo_id, repo_type=repo_type, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                          commit_message="palm build-dataset")
