"""Building typed settings objects from config sections, with unknown fields named.

Config sections (``ml_collections.ConfigDict`` or plain dicts) reach frozen dataclasses such
as ``lungjax.data.augment.AugmentConfig``; a misspelt key must stop the run with the section
and the key in the message instead of being silently dropped or raising a bare ``TypeError``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def as_dict(d: Mapping[str, Any]) -> dict:
    """A plain dict of a ``ConfigDict`` (``to_dict``) or of any mapping."""
    return dict(d.to_dict() if hasattr(d, "to_dict") else d)


def dataclass_from_mapping(cls: type[T], d: Mapping[str, Any] | None, section: str) -> T:
    """``cls(**d)`` after checking that every key of ``d`` is a field of ``cls``.

    Args:
      cls: a dataclass type.
      d: its field values (dict or ConfigDict); None = every field at its default.
      section: the config section's dotted name, used in the error (e.g. "augment.positive").

    Raises:
      ValueError: naming ``section``, the unknown keys and the known fields.
    """
    if d is None:
        return cls()
    d = as_dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{section}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**d)
