"""Small value checks shared by the config dataclasses."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar

from toolkit.errors import HookNotFoundError
from toolkit.sites import Site


def positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def reject_unknown_keys(cls: type, d: dict[str, Any]) -> None:
    """ValueError naming the keys of `d` that are not fields of the dataclass `cls`, with the valid ones."""
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {', '.join(valid)}")


def normalize_site(cfg: Any) -> None:
    """Replace cfg.site (if set) by its canonical name; a bad site is a ValueError saying what is valid."""
    if cfg.site is None:
        return
    try:
        object.__setattr__(cfg, "site", Site.parse(cfg.site).name)
    except HookNotFoundError as e:
        raise ValueError(f"site: {e}") from e


def as_json_dict(cfg: Any) -> dict[str, Any]:
    """The dataclass `cfg` as a plain JSON-ready dict (tuple fields become lists)."""
    return {f.name: list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v for f in fields(cfg)}


def with_tuples(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    """A copy of `d` whose list values under `keys` are tuples (the inverse of as_json_dict for those fields)."""
    return {k: tuple(v) if k in keys and isinstance(v, list) else v for k, v in d.items()}


class DictConfig:
    """from_dict / to_dict for a frozen config dataclass; `TUPLES` names the tuple fields JSON stores as lists."""

    TUPLES: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Build from a dict such as a cfg.json; unknown keys raise ValueError listing the valid ones."""
        reject_unknown_keys(cls, d)
        return cls(**with_tuples(d, *cls.TUPLES))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; `cls.from_dict(cfg.to_dict()) == cfg`."""
        return as_json_dict(self)
