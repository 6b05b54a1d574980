"""What a precomputed reference column was computed with, and the check that training agrees.

`dpo-jax ref-logps` writes, on every row next to `ref_chosen_logps` /
`ref_rejected_logps`, a field `ref_logps_fingerprint`: a small JSON object naming
everything that decides which tokens those numbers score and which model scored them
(see `COMPARED`). It is stored per row, not in a sidecar file, so it survives
concatenating, shuffling, subsetting or converting the file, and a file mixing rows
computed differently is caught row by row.

Training reads the rows again when its data carries reference columns and refuses
(`UserError`, one line: the row and the settings that differ) any row whose
fingerprint disagrees with its own settings. A row with reference columns and no
fingerprint (written by TRL or by an older dpo-jax) is refused too unless
`reference.trust_precomputed=True`: such a column silently scored other tokens in the
past (issue 17: loss 6.5 where TRL gave 0.86), and the flag makes trusting it a choice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from dpo_jax import data, paths
from dpo_jax.data.formats import REF_CHOSEN_COLUMN, REF_REJECTED_COLUMN, detect_format
from dpo_jax.data.tokenize import settings_from_spec, tokenizer_fingerprint
from dpo_jax.errors import UserError
from dpo_jax.paths import Path  # local or gs:// (etils.epath)

FINGERPRINT_COLUMN = "ref_logps_fingerprint"
# Fields compared between a column and a training run; `dtype` is recorded only.
COMPARED = (
    "format", "tokenizer", "chat_template", "add_eos", "max_length", "max_prompt_length",
    "max_completion_length", "truncation_mode", "model",
)  # fmt: skip
_CHUNKS = 16  # sampled 64 KiB chunks per safetensors file
_CHUNK = 1 << 16


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_identity(model_dir: str | os.PathLike) -> str:
    """Hash of a checkpoint directory's weights: every safetensors header (names, shapes,
    dtypes, offsets), file sizes and 16 evenly spaced 64 KiB chunks of each file.

    Constant time however large the model; two checkpoints with the same shapes but
    different weights (e.g. a fine-tune of the other) differ in every sampled chunk.
    """
    h = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    for path in files:
        size = paths.size(path)
        h.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, size)))
            for i in range(_CHUNKS):
                f.seek(size * i // _CHUNKS)
                h.update(f.read(_CHUNK))
    return h.hexdigest()[:16]


def base_fingerprint(
    spec: Mapping[str, Any], tokenizer: Any, model_dir: str | os.PathLike | None, dtype: str = ""
) -> dict[str, Any]:
    """Every compared field except `format` (resolved per source), from a data spec
    (`data.spec_from_config`) and the tokenizer and reference checkpoint it is scored with."""
    template = getattr(tokenizer, "chat_template", None)
    s = settings_from_spec(spec)  # the tokenizer settings' own defaults, not restated here
    return {
        "tokenizer": tokenizer_fingerprint(tokenizer)[:16],
        "chat_template": _short(template) if isinstance(template, str) else None,
        "add_eos": bool(s.add_eos),
        "max_length": s.max_length,
        "max_prompt_length": s.max_prompt_length,
        "max_completion_length": s.max_completion_length,
        "truncation_mode": s.truncation_mode,
        "model": model_identity(model_dir) if model_dir else None,
        "dtype": dtype,
    }


def with_format(base: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """A row's fingerprint: the base plus the format its row was parsed as."""
    return {"format": fmt, **base}


def differences(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """`key=found (this run: expected)` for every compared field that differs."""
    out = []
    for key in COMPARED:
        if key == "model" and (found.get(key) is None or expected.get(key) is None):
            continue  # the run's params came from memory: nothing to compare
        if found.get(key) != expected.get(key):
            out.append(f"{key}={found.get(key)!r} (this run: {expected.get(key)!r})")
    return out


def check_rows(
    rows: Sequence[Any],
    fmt: str,
    base: Mapping[str, Any],
    *,
    trust_unfingerprinted: bool,
    ref_columns: Sequence[str],
) -> int:
    """Refuse the first row whose reference columns were computed differently from `base`.

    `rows`: located rows (`data.Row`); `fmt`: the run's `data.format` ("auto" resolves
    per source as the parser does). Returns how many rows carried no fingerprint
    (allowed only with `trust_unfingerprinted`).
    """
    detected: dict[str, str] = {}
    missing = 0
    for row in rows:
        if not any(c in row.data for c in ref_columns):
            continue
        found = row.data.get(FINGERPRINT_COLUMN)
        if found is None:
            if not trust_unfingerprinted:
                raise UserError(
                    f"{row.source}:{row.line}: reference log-probs without a"
                    f" '{FINGERPRINT_COLUMN}' field, so nothing shows they score the tokens this"
                    " run scores; recompute them with `dpo-jax ref-logps --config <this config>`,"
                    " use reference.mode=cache, or set reference.trust_precomputed=True"
                )
            missing += 1
            continue
        if isinstance(found, str):
            found = json.loads(found)
        if fmt == "auto" and row.source not in detected:
            detected[row.source] = detect_format(row.data)
        expected = with_format(base, detected.get(row.source, fmt))
        diff = differences(found, expected)
        if diff:
            raise UserError(
                f"{row.source}:{row.line}: reference log-probs were computed with other settings:"
                f" {'; '.join(diff)}; recompute them with `dpo-jax ref-logps --config <this"
                " config>` or use reference.mode=cache"
            )
    return missing


def check_data(config: Any, tokenizer: Any, spec: Mapping[str, Any]) -> int:
    """Check every fingerprinted reference column of the source `spec` against the run's
    settings (`config`: the train config; `spec`: `data.spec_from_config`). Returns the count
    of trusted rows without a fingerprint; raises `UserError` on any disagreement."""
    model_dir = config.reference.path or config.model.path or None
    if model_dir is not None and not list(Path(model_dir).glob("*.safetensors")):
        model_dir = None  # params from memory or another store: the model is not compared
    base = base_fingerprint(spec, tokenizer, model_dir)
    path = spec["path"]
    sources = [path] if isinstance(path, str | Mapping) else list(path)
    rows = data.read_sources(sources, data.RejectLog(skip_bad_rows=True))
    return check_rows(
        rows, spec["format"], base,
        trust_unfingerprinted=bool(config.reference.trust_precomputed),
        ref_columns=(REF_CHOSEN_COLUMN, REF_REJECTED_COLUMN),
    )  # fmt: skip
