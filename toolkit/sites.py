"""Named activation sites (kind, layer) and the Gemma module each one reads or writes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from toolkit.errors import HookNotFoundError

# kind -> (submodule of the decoder layer or None for the layer itself, "input" | "output", order in the layer)
# Order follows execution inside a Gemma-2/3 decoder layer, which nnsight requires for reads and writes.
_KINDS: dict[str, tuple[str | None, Literal["input", "output"], int, str]] = {
    "resid_pre": (None, "input", 0, "residual stream entering the layer"),
    "attn_z": ("self_attn.o_proj", "input", 1, "concatenated head outputs before o_proj (Gemma Scope 'att')"),
    "attn_out": ("post_attention_layernorm", "output", 2, "attention block output added to the residual"),
    "resid_mid": ("pre_feedforward_layernorm", "input", 3, "residual stream between attention and MLP"),
    "mlp_post": ("mlp.down_proj", "input", 4, "MLP hidden activations before down_proj"),
    "mlp_out": ("post_feedforward_layernorm", "output", 5, "MLP block output added to the residual (Gemma Scope 'mlp')"),
    "resid_post": (None, "output", 6, "residual stream leaving the layer (Gemma Scope 'res')"),
}
SITE_KINDS: tuple[str, ...] = tuple(_KINDS)

_PATTERNS = (
    re.compile(r"^blocks\.(?P<layer>-?\d+)\.(?:hook_)?(?P<kind>[a-z_]+)$"),  # blocks.6.resid_post, TransformerLens style
    re.compile(r"^(?P<kind>[a-z_]+)\.(?P<layer>-?\d+)$"),  # resid_post.6
    re.compile(r"^layer_?(?P<layer>-?\d+)[/.](?P<kind>[a-z_]+)$"),  # layer_6/resid_post
)
_ALIASES = {"res": "resid_post", "att": "attn_z", "mlp": "mlp_out", "z": "attn_z", "mlp_act": "mlp_post"}


@dataclass(frozen=True, order=True)
class Site:
    """One activation site: `kind` (see SITE_KINDS) at decoder layer `layer` (0-based)."""

    layer: int
    kind: str

    def __init__(self, kind: str, layer: int) -> None:
        if not isinstance(kind, str):
            raise HookNotFoundError(f"site kind must be a string, one of {', '.join(SITE_KINDS)}; got {kind!r}")
        kind = _ALIASES.get(kind, kind)
        if kind not in _KINDS:
            raise HookNotFoundError(f"unknown site kind {kind!r}; valid kinds: {', '.join(SITE_KINDS)}")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise HookNotFoundError(f"layer must be an integer, got {layer!r}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "layer", layer)

    @classmethod
    def parse(cls, name: str | Site) -> Site:
        """Accept a Site, 'blocks.6.resid_post', 'blocks.6.hook_resid_post', 'resid_post.6' or 'layer_6/res'."""
        if isinstance(name, Site):
            return name
        if isinstance(name, tuple) and len(name) == 2:
            return cls(name[0], name[1])
        if not isinstance(name, str):
            raise HookNotFoundError(f"a site is a Site or a name like 'blocks.6.resid_post'; got {name!r}")
        for pat in _PATTERNS:
            m = pat.match(name.strip())
            if m:
                return cls(m["kind"], int(m["layer"]))
        raise HookNotFoundError(
            f"cannot parse site name {name!r}; write 'blocks.<layer>.<kind>' with kind one of {', '.join(SITE_KINDS)}"
        )

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"

    @property
    def order(self) -> tuple[int, int]:
        """Execution order key: layer, then position inside the layer."""
        return (self.layer, _KINDS[self.kind][2])

    @property
    def submodule(self) -> str | None:
        return _KINDS[self.kind][0]

    @property
    def io(self) -> Literal["input", "output"]:
        return _KINDS[self.kind][1]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Site({self.kind!r}, {self.layer})"


def describe_kinds() -> dict[str, str]:
    """Site kinds and what each one is."""
    return {k: v[3] for k, v in _KINDS.items()}


def validate_site(site: str | Site, n_layers: int) -> Site:
    """Parse `site` and check its layer against the model; raise HookNotFoundError listing what is valid."""
    s = Site.parse(site)
    if not 0 <= s.layer < n_layers:
        raise HookNotFoundError(
            f"layer {s.layer} out of range for site {s.kind!r}: this model has layers 0..{n_layers - 1}; "
            f"valid site kinds: {', '.join(SITE_KINDS)}"
        )
    return s


def site_width(site: Site, d_model: int, n_heads: int, head_dim: int, d_mlp: int) -> int:
    """Width of the activation vector at `site`."""
    if site.kind == "attn_z":
        return n_heads * head_dim
    if site.kind == "mlp_post":
        return d_mlp
    return d_model


def module_path(site: Site) -> str:
    """Dotted path of the module `site` reads, under the HF causal LM (for plain PyTorch hooks)."""
    base = f"model.layers.{site.layer}"
    return base if site.submodule is None else f"{base}.{site.submodule}"
