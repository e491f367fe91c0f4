"""The feature store's one streaming pass: per-latent statistics gathered over token contexts, resumable.

Everything is kept per latent in fixed-size arrays, so memory does not grow with the corpus:
- fires / max / sum of activations (density, max, mean);
- a histogram of non-zero activations with B linear bins [0, B·2^e) whose width 2^e doubles (neighbouring bins
  merged, exactly) whenever a larger activation arrives;
- the top-k contexts by the latent's maximum in the context, with the activation window around that token;
- a uniform reservoir of contexts where the latent fires (priority = a hash of context and latent, so a resumed
  build keeps exactly the same samples), later split into activation quantiles.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import check_finite
from toolkit.io import atomic_save_tensors, load_tensors

STATE_FILE = "build-state.safetensors"
_UNSET = -10_000  # histogram exponent of a latent that has not fired yet


@dataclass(frozen=True)
class StoreSettings:
    """What the store keeps per latent."""

    top_k: int = 16
    """Top activating contexts kept per latent."""
    n_samples: int = 24
    """Contexts sampled uniformly among those where the latent fires, split into quantiles."""
    n_quantiles: int = 4
    """Activation quantile bands the samples are shown in."""
    bins: int = 32
    """Histogram bins of the non-zero activations."""
    window: tuple[int, int] = (12, 4)
    """Tokens kept before and after the strongest token of a context."""
    lens_k: int = 10
    """Promoted and suppressed tokens kept by the logit lens."""
    n_neighbours: int = 10
    """Nearest latents by decoder cosine."""
    seed: int = 0
    """Seed of the reservoir's hash priorities."""

    def __post_init__(self) -> None:
        for name in ("top_k", "n_samples", "n_quantiles", "bins", "lens_k", "n_neighbours"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"StoreSettings.{name} must be a positive integer, got {v!r}")
        w = tuple(self.window)
        if len(w) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in w):
            raise ValueError(f"StoreSettings.window must be two integers >= 0 (before, after), got {self.window!r}")
        object.__setattr__(self, "window", w)

    @property
    def width(self) -> int:
        return self.window[0] + self.window[1] + 1

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "window": list(self.window)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StoreSettings:
        return cls(**{**d, "window": tuple(d["window"])})


def _hash_priority(ctx: torch.Tensor, latent: torch.Tensor, seed: int) -> torch.Tensor:
    """A deterministic pseudo-random int64 in [0, 2^32) per (context, latent) pair (murmur-style mixing)."""
    mask = 0xFFFFFFFF
    h = (ctx * 0x9E3779B1 + latent * 0x85EBCA77 + (seed + 1) * 0xC2B2AE3D) & mask
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & mask
    h ^= h >> 12
    h = (h * 0x297A2D39) & mask
    return h ^ (h >> 15)


class LatentStats:
    """Running per-latent statistics; `update` takes dense codes of a batch of contexts."""

    def __init__(self, d_sae: int, ctx_len: int, settings: StoreSettings) -> None:
        s, d = settings, d_sae
        self.settings, self.d_sae, self.ctx_len = s, d, ctx_len
        self.win = min(s.width, max(ctx_len - 1, 1))
        self.t: dict[str, torch.Tensor] = {
            "n_tokens": torch.zeros((), dtype=torch.int64), "next_context": torch.zeros((), dtype=torch.int64),
            "fires": torch.zeros(d, dtype=torch.int64), "max": torch.zeros(d), "sum": torch.zeros(d, dtype=torch.float64),
            "hist": torch.zeros(d, s.bins, dtype=torch.int64), "hist_exp": torch.full((d,), _UNSET, dtype=torch.int64),
        }
        for prefix, k, empty_key in (("top", s.top_k, torch.full((d, s.top_k), -1.0)),
                                     ("res", s.n_samples, torch.full((d, s.n_samples), -1, dtype=torch.int64))):
            self.t[f"{prefix}_key"] = empty_key  # -1 marks an empty slot: real keys are > 0 (top) or >= 0 (res)
            self.t[f"{prefix}_val"] = torch.zeros(d, k)
            for name in ("ctx", "pos", "start"):
                self.t[f"{prefix}_{name}"] = torch.zeros(d, k, dtype=torch.int64)
            self.t[f"{prefix}_win"] = torch.zeros(d, k, self.win)

    # ------------------------------------------------------------------ one batch

    def update(self, codes: torch.Tensor, offset: int, n_real: int) -> None:
        """Fold in dense codes (b, ctx, d_sae) of contexts offset.. (BOS and pads already zeroed)."""
        t = self.t
        t["n_tokens"] += n_real
        t["next_context"].fill_(offset + codes.shape[0])
        fired = codes != 0
        t["fires"] += fired.sum((0, 1))
        t["sum"] += codes.sum((0, 1), dtype=torch.float64)
        cmax, cpos = codes.max(1)  # (b, d): each context's strongest token per latent
        t["max"] = torch.maximum(t["max"], cmax.max(0).values.clamp(min=0))
        self._histogram(codes, cmax.max(0).values)
        ctx_ids = torch.arange(offset, offset + codes.shape[0])[:, None].expand_as(cmax)
        live = cmax > 0
        top_key = torch.where(live, cmax, torch.full_like(cmax, -1.0))
        res_key = torch.where(live, _hash_priority(ctx_ids, torch.arange(self.d_sae)[None], self.settings.seed),
                              torch.full_like(ctx_ids, -1))
        for prefix, key in (("top", top_key), ("res", res_key)):
            self._merge(prefix, key.T, cmax.T, ctx_ids.T, cpos.T, codes, offset)

    def _histogram(self, codes: torch.Tensor, batch_max: torch.Tensor) -> None:
        t, bins = self.t, self.settings.bins
        pos = batch_max > 0
        need = torch.full_like(t["hist_exp"], _UNSET)
        # smallest e with bins * 2^e > max: bins double in width until the largest activation fits
        need[pos] = torch.floor(torch.log2(batch_max[pos].double() / bins)).long() + 1
        new_exp = torch.maximum(t["hist_exp"], need)
        shift = (new_exp - t["hist_exp"]).clamp(max=62)
        grow = (t["hist_exp"] != _UNSET) & (shift > 0)
        if grow.any():
            old = t["hist"][grow]
            merged = torch.zeros_like(old)
            merged.scatter_add_(1, torch.arange(bins)[None] >> shift[grow][:, None], old)
            t["hist"][grow] = merged
        t["hist_exp"] = new_exp
        where = (codes > 0).nonzero()
        if len(where) == 0:
            return
        latent = where[:, 2]
        vals = codes[where[:, 0], where[:, 1], latent].double()
        b = torch.floor(vals * torch.exp2(-new_exp[latent].double())).long().clamp(0, bins - 1)
        t["hist"].view(-1).index_add_(0, latent * bins + b, torch.ones_like(b))

    def _merge(self, prefix: str, key: torch.Tensor, val: torch.Tensor, ctx: torch.Tensor, pos: torch.Tensor,
               codes: torch.Tensor, offset: int) -> None:
        """Keep the k largest keys per latent among the kept ones and this batch's (d, b) candidates."""
        t = self.t
        k = t[f"{prefix}_key"].shape[1]
        keys = torch.cat([t[f"{prefix}_key"], key], 1)
        kept_key, sel = keys.topk(k, dim=1)
        new = sel >= k
        t[f"{prefix}_key"] = kept_key
        for name, fresh in (("val", val), ("ctx", ctx), ("pos", pos)):
            t[f"{prefix}_{name}"] = torch.cat([t[f"{prefix}_{name}"], fresh], 1).gather(1, sel)
        old = sel.clamp(max=k - 1)
        start = t[f"{prefix}_start"].gather(1, old)
        win = t[f"{prefix}_win"].gather(1, old[..., None].expand(-1, -1, self.win))
        if new.any():
            lat, slot = new.nonzero(as_tuple=True)
            p = t[f"{prefix}_pos"][lat, slot]
            lo = (p - self.settings.window[0]).clamp(min=1).clamp(max=max(self.ctx_len - self.win, 1))
            rows = t[f"{prefix}_ctx"][lat, slot] - offset
            cols = lo[:, None] + torch.arange(self.win)[None]
            start[lat, slot] = lo
            win[lat, slot] = codes[rows[:, None], cols, lat[:, None]]
        t[f"{prefix}_start"], t[f"{prefix}_win"] = start, win

    # ------------------------------------------------------------------ persistence

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        atomic_save_tensors(path, self.t, metadata={"meta": json.dumps(meta, sort_keys=True)})

    @classmethod
    def load(cls, path: Path, d_sae: int, ctx_len: int, settings: StoreSettings) -> tuple[LatentStats, dict[str, Any]]:
        from safetensors import safe_open

        stats = cls(d_sae, ctx_len, settings)
        tensors = load_tensors(path)
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        stats.t.update(tensors)
        return stats, meta


def decoder_neighbours(W_dec: torch.Tensor, k: int, *, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest latents by decoder cosine: (ids, cosines), each (d_sae, k), self excluded; chunked rows."""
    W = torch.nn.functional.normalize(W_dec.detach().float().cpu(), dim=1)
    d = W.shape[0]
    k = min(k, d - 1)
    ids, cos = [], []
    for lo in range(0, d, chunk):
        sims = W[lo:lo + chunk] @ W.T  # (chunk, d_sae): never the d_sae^2 matrix
        rows = torch.arange(lo, min(lo + chunk, d))
        sims[rows - lo, rows] = -float("inf")
        c, i = sims.topk(k, dim=1)
        ids.append(i)
        cos.append(c)
    if not ids:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    return torch.cat(ids), torch.cat(cos)


def stream_stats(model: Any, sae: Any, site: Any, contexts: torch.Tensor, state_path: Path, settings: StoreSettings,
                 meta: dict[str, Any], *, batch_size: int, checkpoint_every: int, progress: bool) -> LatentStats:
    """The streaming pass; resumes from `state_path` (written atomically every `checkpoint_every` contexts)."""
    from toolkit.errors import CacheError
    from toolkit.tracing import iter_capture

    n, ctx_len = contexts.shape
    if state_path.exists():
        stats, saved = LatentStats.load(state_path, sae.d_sae, ctx_len, settings)
        if saved != meta:
            diff = sorted(k for k in set(saved) | set(meta) if saved.get(k) != meta.get(k))
            raise CacheError(f"{state_path}: a partial build with other settings ({', '.join(diff)} differ); "
                             "delete the folder or build into another one")
    else:
        stats = LatentStats(sae.d_sae, ctx_len, settings)
    start = int(stats.t["next_context"])
    since = 0
    for offset, acts in iter_capture(model, contexts, site, batch_size=batch_size, progress=progress,
                                     start=start, desc=f"feature store {site.name}"):
        x = acts[site.name]
        where = f"activations at {site.name} (contexts {offset}..{offset + len(x) - 1})"
        check_finite(x, where)
        with torch.no_grad():
            codes = sae.encode(x.to(sae.device, sae.dtype)).float().cpu()
        check_finite(codes, "SAE codes of " + where)
        keep = contexts[offset:offset + len(x)] != model.bos_token_id
        codes[~keep] = 0
        stats.update(codes, offset, int(keep.sum()))
        since += len(x)
        if since >= checkpoint_every:
            stats.save(state_path, meta)
            since = 0
    if since or not state_path.exists():
        stats.save(state_path, meta)
    return stats


def finish_arrays(stats: LatentStats) -> dict[str, Any]:
    """The store's per-latent arrays (numpy) from finished statistics: empty slots get context -1."""
    t = stats.t
    n_tok = max(int(t["n_tokens"]), 1)
    fires = t["fires"].double()
    big = float(t["max"].max()) if t["max"].numel() else 0.0
    act_dtype = torch.float16 if big < 6.0e4 else torch.float32  # windows are the bulk of the store
    out: dict[str, Any] = {
        "density": (fires / n_tok).float(), "max_act": t["max"].float(),
        "mean_act": (t["sum"] / fires.clamp(min=1)).float(),
        "hist_counts": t["hist"].int(),
        "hist_width": torch.where(t["hist_exp"] == _UNSET, torch.zeros(()),
                                  torch.exp2(t["hist_exp"].clamp(min=-126).double()).float()),
    }
    for prefix, name in (("top", "top"), ("res", "sample")):
        key, val = t[f"{prefix}_key"], t[f"{prefix}_val"]
        order = val.argsort(dim=1, descending=True) if prefix == "top" else val.argsort(dim=1)
        empty = key.gather(1, order) < 0
        out[f"{name}_act"] = val.gather(1, order).float()
        for field in ("ctx", "pos", "start"):
            v = t[f"{prefix}_{field}"].gather(1, order)
            out[f"{name}_{field}"] = torch.where(empty, -1 if field == "ctx" else 0, v).int()
        win = t[f"{prefix}_win"].gather(1, order[..., None].expand(-1, -1, stats.win))
        out[f"{name}_acts"] = torch.where(empty[..., None], 0.0, win).to(act_dtype)
    return {k: v.numpy() for k, v in out.items()}
