"""CacheConfig: what an activation cache holds."""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.config._checks import DictConfig

_CACHE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CacheConfig(DictConfig):
    """What an activation cache holds, stored as its cache.json; resuming a cache requires an equal config."""

    TUPLES = ("sites", "d")

    model: str
    """Name of the model the activations come from (Model.name)."""

    sites: tuple[str, ...]
    """Canonical site names, e.g. ('blocks.6.resid_post',); each shard holds one tensor per site."""

    d: tuple[int, ...]
    """Width of each site, in the order of `sites`."""

    ctx_len: int
    """Tokens per context, BOS included."""

    n_contexts: int
    """Contexts the finished cache holds; while filling, the complete shards cover a prefix of them."""

    fingerprint: str
    """sha256 (hex) of the token contexts (and attention mask, if any); resuming on other tokens is refused."""

    shard_contexts: int = 64
    """Contexts per shard file; the last shard may hold fewer."""

    dtype: str = "float32"
    """Storage dtype: 'float32', 'bfloat16' (half the disk) or 'float16'."""

    keep_bos: bool = False
    """Store BOS positions too. By default BOS (an attention sink with outlier norms) and padding are dropped,
    so rows are real tokens only."""

    bos_token_id: int | None = None
    """Token id whose positions are dropped when keep_bos is False (None: only padding is dropped)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        sites, d = tuple(self.sites), tuple(self.d)
        if not sites or not all(isinstance(s, str) and s for s in sites):
            raise ValueError(f"sites must be a non-empty sequence of site names, got {self.sites!r}")
        if len(set(sites)) != len(sites):
            raise ValueError(f"sites must not repeat, got {sites}")
        if len(d) != len(sites):
            raise ValueError(f"d must give one width per site: {len(sites)} sites but {len(d)} widths")
        sizes = [("ctx_len", self.ctx_len), ("n_contexts", self.n_contexts), ("shard_contexts", self.shard_contexts)]
        for name, value in sizes + [(f"d[{i}]", w) for i, w in enumerate(d)]:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.fingerprint, str) and len(self.fingerprint) == 64
                and all(c in "0123456789abcdef" for c in self.fingerprint)):
            raise ValueError(f"fingerprint must be a sha256 hex digest (64 lowercase hex digits), got {self.fingerprint!r}")
        if self.dtype not in _CACHE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_CACHE_DTYPES)}; got {self.dtype!r}")
        if not isinstance(self.keep_bos, bool):
            raise ValueError(f"keep_bos must be True or False, got {self.keep_bos!r}")
        if self.bos_token_id is not None and (isinstance(self.bos_token_id, bool) or not isinstance(self.bos_token_id, int)):
            raise ValueError(f"bos_token_id must be an integer or None, got {self.bos_token_id!r}")
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "d", d)

    @property
    def n_shards(self) -> int:
        """Shard files in the finished cache."""
        return -(-self.n_contexts // self.shard_contexts)

    @property
    def tokens_per_shard(self) -> int:
        """Token positions captured per full shard, before BOS and padding are dropped."""
        return self.shard_contexts * self.ctx_len

    def shard_range(self, i: int) -> tuple[int, int]:
        """Context rows [start, stop) that shard `i` covers."""
        if not 0 <= i < self.n_shards:
            raise IndexError(f"shard {i} out of range: this cache has shards 0..{self.n_shards - 1}")
        return i * self.shard_contexts, min((i + 1) * self.shard_contexts, self.n_contexts)
