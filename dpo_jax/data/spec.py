"""A data spec: the dict (or ConfigDict) that says what `load_preference_data`,
`load_prompts` and `load_examples` read and how it is tokenized.

Its keys and their defaults are `configs.default.data_spec()`'s; `complete_spec` fills a
partial spec from there once, at each public reader's entry, so the readers below index
a complete spec and restate no default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def as_dict(spec: Any) -> dict[str, Any]:
    """A plain dict copy of a dict or ConfigDict spec."""
    if hasattr(spec, "to_dict"):  # ml_collections.ConfigDict
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise TypeError(f"data spec must be a dict or ConfigDict, got {type(spec).__name__}")
    return dict(spec)


def complete_spec(spec: Any) -> dict[str, Any]:
    """`spec` (possibly partial) over `configs.default.data_spec()`: the one place a data
    spec's missing key gets its default. Keys no reader reads (the rest of a run's
    `config.data`, an experiment's own) are kept and ignored, so a whole `config.data`
    is a spec."""
    from dpo_jax.configs import default  # lazy: default imports sharding (jax); data does not

    return {**default.data_spec(), **as_dict(spec)}
