"""Hugging Face Hub names (`org/name`) as local directories, through huggingface_hub.

    hub.snapshot_dir("org/name", allow_downloads=False)  # the cached snapshot's directory

A name resolves to its snapshot in the Hugging Face cache (`HF_HUB_CACHE`, or
`HF_HOME/hub`: `models--org--name/snapshots/<revision>/`, the revision `refs/main`
names), as `huggingface-cli download` or any transformers / huggingface_hub download
left it. Nothing is downloaded unless `allow_downloads` (the config's top-level
`allow_downloads`); with `HF_HUB_OFFLINE=1` the cache alone is read either way.
"""

from __future__ import annotations

import os
import re

from dpo_jax.errors import UserError

# A Hub repository id: one "/" between an owner and a name (no path, no URL).
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# What a model directory needs (config, weights, tokenizer), not other formats' weights.
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
FLAG = "allow_downloads"  # the config key that allows downloads


def is_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hub repository id (`org/name`) and is no local path."""
    return bool(_REPO_ID.fullmatch(name)) and not os.path.exists(name)


def snapshot_dir(
    name: str,
    *,
    repo_type: str = "model",
    allow_downloads: bool = False,
    where: str = "config key 'model.path'",
) -> str:
    """The local directory of Hub repository `name` (`repo_type` "model" or "dataset"): its
    cached snapshot, downloaded first when `allow_downloads`. A name that is not cached
    (downloads off) or cannot be fetched is one `UserError` starting with `where` and
    naming the flag."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    patterns = list(MODEL_FILES) if repo_type == "model" else None
    try:
        return snapshot_download(
            name, repo_type=repo_type, local_files_only=not allow_downloads,
            allow_patterns=patterns,
        )  # fmt: skip
    except (LocalEntryNotFoundError, FileNotFoundError):
        if allow_downloads:
            raise UserError(
                f"{where}: {name!r} is not in the Hugging Face cache and could not be "
                "downloaded (offline? HF_HUB_OFFLINE is set?)"
            ) from None
        raise UserError(
            f"{where}: {name!r} is no local directory and not in the Hugging Face cache; "
            f"set {FLAG}=True (--config.{FLAG}=True) to download it"
        ) from None
    except (HFValidationError, OSError, ValueError) as e:  # HTTP errors are OSErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where}: {name!r}: {first}") from None
