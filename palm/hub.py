"""Talking to the Hugging Face Hub: downloads into huggingface_hub's cache, with one-line errors."""

from __future__ import annotations

from pathlib import Path

from palm.errors import PalmError


def hub_download(repo_id: str, filename: str) -> Path:
    """Download one file of a Hub repo into the huggingface_hub cache (or find it there)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import logging as hub_logging

    # huggingface_hub logs every retry on stderr; the user gets our one-line error instead.
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:  # network, auth, missing repo or file: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PalmError(
            f"could not get {filename} from the Hugging Face Hub repo {repo_id} ({reason}); "
            f"if this machine is offline, download the file elsewhere and pass its local path instead"
        ) from None
    finally:
        hub_logging.set_verbosity(verbosity)
