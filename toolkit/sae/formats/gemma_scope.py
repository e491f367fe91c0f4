"""Gemma Scope SAEs: find params.npz locally, in the HF cache or on the Hub, and read it."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from toolkit.errors import CheckpointError, ModelUnavailableError
from toolkit.io import Weights
from toolkit.sae.formats.common import build, take

DEFAULT_RELEASE = "gemma-scope-2b-pt-res"
DEFAULT_L0 = 100
"""With l0=None, the Gemma Scope SAE whose average L0 is closest to this (ties: the smaller), as SAELens'
'canonical' Gemma Scope releases do."""

_RELEASE = re.compile(r"gemma-scope-(?P<size>\d+b)-(?P<variant>pt|it)-(?P<kind>res|mlp|att)")
_KIND_TO_SITE = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}
_L0_DIR = re.compile(r"^average_l0_(\d+)$")


def release_info(release: str, layer: int | None) -> tuple[str | None, str | None]:
    """(model, site) for a Gemma Scope release name such as 'gemma-scope-2b-pt-res' and a layer; None where unknown."""
    m = _RELEASE.search(release)
    if not m:
        return None, None
    model = f"google/gemma-2-{m['size']}" + ("-it" if m["variant"] == "it" else "")
    site = None if layer is None else f"blocks.{layer}.{_KIND_TO_SITE[m['kind']]}"
    return model, site


def read_gemma_scope(path: str | os.PathLike | None = None, *, release: str = DEFAULT_RELEASE,
                     layer: int | None = None, width: str = "16k", l0: int | None = None,
                     local_dir: str | os.PathLike | None = None, model: str | None = None, site: str | None = None,
                     dtype: str = "float32") -> Weights:
    """Read a Gemma Scope params.npz as a JumpReLU SAE's config and tensors (apply_b_dec_to_input=False).

    Give `path` (the file or its folder), or `layer` (plus release/width/l0/local_dir) to find it with
    `gemma_scope_path`. model and site are read from the path when it names the release, unless given.
    """
    named_by = None
    if path is None:
        if layer is None:
            raise ValueError("from_gemma_scope needs a params.npz path, or layer= (with release=, width=, l0=)")
        path = gemma_scope_path(release, layer=layer, width=width, l0=l0, local_dir=local_dir)
        named_by = release
    path = Path(path)
    if path.is_dir():
        path = path / "params.npz"
    arrays = _load_npz(path)
    if "W_enc" not in arrays or arrays["W_enc"].ndim != 2:
        raise CheckpointError(f"{path}: needs a 2-D W_enc (d_in, d_sae); has {sorted(arrays)}")
    d_in, d_sae = arrays["W_enc"].shape
    tensors = take({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
                   {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
                    "threshold": (d_sae,)}, path)
    layer_match = re.search(r"layer_(\d+)", str(path))
    found_model, found_site = release_info(named_by or str(path), int(layer_match[1]) if layer_match else None)
    cfg = {"d_in": d_in, "d_sae": d_sae, "architecture": "jumprelu", "dtype": dtype, "apply_b_dec_to_input": False,
           "model": model or found_model, "site": site or found_site}
    return build(cfg, tensors, weights_file=path, cfg_file=path)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file missing")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read ({e}); the file is truncated or not an .npz") from e


def gemma_scope_path(release: str = DEFAULT_RELEASE, *, layer: int, width: str = "16k", l0: int | None = None,
                     local_dir: str | os.PathLike | None = None) -> Path:
    """Path of `layer_{layer}/width_{width}/average_l0_{l0}/params.npz` of the HF repo google/{release}.

    With `local_dir`, look only in that folder (same layout as the repo). Otherwise download it with
    huggingface_hub (which reuses its cache). l0=None picks the available L0 closest to DEFAULT_L0.
    Raises ModelUnavailableError saying what was tried and how to fix it.
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a non-negative integer, got {layer!r}")
    subdir = f"layer_{layer}/width_{width}"
    if local_dir is not None:
        root = Path(local_dir)
        if not root.is_dir():
            raise ModelUnavailableError(
                f"local_dir {root} is not a folder; it should hold the google/{release} layout "
                f"({subdir}/average_l0_<N>/params.npz)"
            )
        folder = root / subdir
        available = sorted(int(m[1]) for p in (folder.iterdir() if folder.is_dir() else ())
                           if (m := _L0_DIR.match(p.name)) and (p / "params.npz").is_file())
        chosen = _choose_l0(l0, available, f"{folder} (local_dir)")
        return folder / f"average_l0_{chosen}" / "params.npz"

    repo = f"google/{release}"
    if l0 is None:
        l0 = _choose_l0(None, _hub_l0s(repo, subdir), f"{repo}/{subdir}")
    filename = f"{subdir}/average_l0_{l0}/params.npz"
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # the hub raises OSError, HTTP and connection errors of several libraries
        raise ModelUnavailableError(_hub_message(repo, filename, e)) from e


def _choose_l0(l0: int | None, available: list[int], where: str) -> int:
    if not available:
        raise ModelUnavailableError(f"no average_l0_<N>/params.npz under {where}; check layer and width")
    if l0 is None:
        return min(available, key=lambda v: (abs(v - DEFAULT_L0), v))
    if l0 not in available:
        raise ModelUnavailableError(f"average_l0_{l0} is not under {where}; available l0: {available}")
    return l0


def _hub_l0s(repo: str, subdir: str) -> list[int]:
    from huggingface_hub import list_repo_files

    pattern = re.compile(rf"^{re.escape(subdir)}/average_l0_(\d+)/params\.npz$")
    try:
        files = list_repo_files(repo)
    except Exception as e:
        cached = _cached_l0s(repo, subdir)
        if cached:  # offline: choose among what the cache holds
            return cached
        raise ModelUnavailableError(_hub_message(repo, f"{subdir}/average_l0_<N>/params.npz", e)) from e
    return sorted({int(m[1]) for f in files if (m := pattern.match(f))})


def _cached_l0s(repo: str, subdir: str) -> list[int]:
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")) / "snapshots"
    return sorted({int(m[1]) for p in snapshots.glob(f"*/{subdir}/average_l0_*/params.npz")
                   if (m := _L0_DIR.match(p.parent.name))})


def _hub_message(repo: str, filename: str, e: Exception) -> str:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    tried = f"tried to get {filename} from the Hugging Face repo {repo}"
    if isinstance(e, GatedRepoError):
        why = (f"the repo is gated: accept its license at https://huggingface.co/{repo}, then log in "
               "(`huggingface-cli login`) or set HF_TOKEN")
    elif isinstance(e, RepositoryNotFoundError):
        why = "the repo does not exist or you have no access (check the release name; set HF_TOKEN if it is gated)"
    elif isinstance(e, LocalEntryNotFoundError) or not isinstance(e, EntryNotFoundError):
        why = (f"the Hub cannot be reached and the file is not in the local cache ({type(e).__name__}: {e}). "
               f"Offline, pass local_dir= a folder with the repo's layout (<local_dir>/{filename}), or download it "
               f"once online: `huggingface-cli download {repo} --include '{filename}'`; "
               "HF_HUB_OFFLINE=1 skips the network retries (gated repos also need HF_TOKEN)")
    else:
        why = "the repo has no such file (check layer, width and l0; l0=None lists the choices)"
    return f"{tried}: {why}"
