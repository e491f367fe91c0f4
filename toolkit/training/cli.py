"""`python -m toolkit train CONFIG`: one command per training job, the same under `torchrun` on a cluster.

CONFIG is a TOML or JSON file:

    kind = "sae"                      # or "crosscoder"
    data = "acts/layer12"             # an activation-cache folder; a crosscoder takes [base cache, fine-tuned cache]
    out_dir = "runs/layer12-bt16k"    # checkpoints and the final module
    resume = true                     # default: continue from the newest complete checkpoint in out_dir, if any
    [train]                           # TrainConfig (SAE) or CrosscoderTraining fields; batch_size is the global batch
    batch_size = 4096
    total_tokens = 200_000_000
    [train.sae]                       # SAE: the SAEConfig fields
    d_in = 2304
    d_sae = 16384
    architecture = "batchtopk"
    k = 64
    site = "blocks.12.resid_post"
    # crosscoder: a [crosscoder] table with the CrosscoderConfig fields instead of [train.sae]

Relative paths are read from the config file's folder. Under `torchrun --nproc-per-node N -m toolkit train CONFIG`
every rank reads the same config and trains its slice of each global batch (toolkit.training.distributed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.config import CrosscoderConfig, CrosscoderTraining, TrainConfig
from toolkit.errors import ArgumentError
from toolkit.tracing import ActivationCache
from toolkit.training import distributed
from toolkit.training.crosscoder_trainer import train_crosscoder
from toolkit.training.sae_trainer import train_sae
from toolkit.training.trainer import TrainResult

__all__ = ["Job", "read_job", "run_job"]

try:
    import tomllib
except ImportError:  # Python 3.10: JSON configs only
    tomllib = None

_KEYS = {"kind", "data", "out_dir", "resume", "train", "crosscoder"}


@dataclass(frozen=True)
class Job:
    """A training job read from a config file."""

    kind: str
    """'sae' or 'crosscoder'."""
    data: tuple[Path, ...]
    """One activation-cache folder (SAE) or two (crosscoder: base, fine-tuned)."""
    out_dir: Path
    """Where checkpoints and the final module go."""
    resume: bool
    """Continue from the newest complete checkpoint in out_dir (a fresh run if there is none)."""
    config: Any
    """TrainConfig (SAE) or (CrosscoderConfig, CrosscoderTraining)."""


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArgumentError(f"{path}: no such config file; give a .toml or .json training config "
                            "(see `python -m toolkit train --help`)")
    if path.suffix != ".json" and tomllib is None:
        raise ArgumentError(f"{path}: reading TOML needs Python >= 3.11; write the config as JSON (same keys)")
    toml_error = tomllib.TOMLDecodeError if tomllib is not None else ValueError
    try:
        text = path.read_text(encoding="utf-8")
        d = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, toml_error) as e:
        raise ArgumentError(f"{path}: not a readable {'JSON' if path.suffix == '.json' else 'TOML'} file "
                            f"({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ArgumentError(f"{path}: the config must be a table/object with keys {sorted(_KEYS)}")
    return d


def _need(d: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    if key not in d or not isinstance(d[key], kind):
        raise ArgumentError(f"{path}: key {key!r} must be a {kind.__name__} (got {d.get(key)!r})")
    return d[key]


def read_job(path: str | Path) -> Job:
    """Parse and check a training config file; ArgumentError naming the key that is wrong and what is right."""
    path = Path(path)
    d = _load(path)
    unknown = sorted(set(d) - _KEYS)
    if unknown:
        raise ArgumentError(f"{path}: unknown key(s) {unknown}; valid: {sorted(_KEYS)}")
    kind = d.get("kind", "sae")
    if kind not in ("sae", "crosscoder"):
        raise ArgumentError(f"{path}: kind must be 'sae' or 'crosscoder', got {kind!r}")
    data = d.get("data")
    data = [data] if isinstance(data, str) else data
    want = 1 if kind == "sae" else 2
    if not isinstance(data, list) or len(data) != want or not all(isinstance(p, str) for p in data):
        what = "one activation-cache folder" if want == 1 else "[base cache folder, fine-tuned cache folder]"
        raise ArgumentError(f"{path}: data must be {what}, got {d.get('data')!r}")
    train = _need(d, "train", dict, path)
    try:
        if kind == "sae":
            config: Any = TrainConfig.from_dict(train)
        else:
            config = (CrosscoderConfig.from_dict(_need(d, "crosscoder", dict, path)),
                      CrosscoderTraining.from_dict(train))
    except (TypeError, ValueError) as e:
        raise ArgumentError(f"{path}: {e}") from None
    base = path.parent
    return Job(kind, tuple(base / p for p in data), base / _need(d, "out_dir", str, path),
               bool(d.get("resume", True)), config)


def run_job(job: Job, *, progress: bool = True) -> TrainResult:
    """Train what `job` says (data parallel when launched by torchrun)."""
    distributed.init_from_env()
    caches = [ActivationCache.open(p) for p in job.data]
    if job.kind == "sae":
        return train_sae(job.config, caches[0], out_dir=job.out_dir, resume=job.resume, progress=progress)
    cc_cfg, training = job.config
    return train_crosscoder(cc_cfg, (caches[0], caches[1]), training, out_dir=job.out_dir, resume=job.resume,
                            progress=progress)
