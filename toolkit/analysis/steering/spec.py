"""SteeringSpec: any number of latent and vector items at any sites, usable in a trace, generation and sweeps."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from toolkit.analysis.steering.edit import SiteSteer
from toolkit.analysis.steering.items import Item, LatentSteer, VectorSteer, check_strength
from toolkit.errors import EmptyInputError
from toolkit.sites import Site
from toolkit.tracing import run_with_edits
from toolkit.tracing.hooked import generate_hooked

if TYPE_CHECKING:
    from toolkit.models import Model


class SteeringSpec:
    """An ordered, immutable collection of steering items (LatentSteer / VectorSteer), mixed freely."""

    def __init__(self, items: Iterable[Item] = ()) -> None:
        items = tuple(items)
        for i, it in enumerate(items):
            if not isinstance(it, (LatentSteer, VectorSteer)):
                raise TypeError(f"item {i} must be a LatentSteer or VectorSteer, got {type(it).__name__}")
        names = [it.name for it in items]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"item names must be unique (they key vectors in to_code/save); repeated: {dup}")
        self.items: tuple[Item, ...] = items

    # ------------------------------------------------------------ composition

    def __add__(self, other: SteeringSpec | Item) -> SteeringSpec:
        more = other.items if isinstance(other, SteeringSpec) else (other,)
        return SteeringSpec(self.items + tuple(more))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, name: str | int) -> Item:
        if isinstance(name, int):
            return self.items[name]
        for it in self.items:
            if it.name == name:
                return it
        raise KeyError(f"no item named {name!r}; items: {[it.name for it in self.items]}")

    def with_strength(self, strength: float, names: str | Sequence[str] | None = None) -> SteeringSpec:
        """A copy with the strength of the named items (default: all) set to `strength`."""
        strength = check_strength(strength)
        chosen = self._names(names)
        return SteeringSpec(it.with_strength(strength) if it.name in chosen else it for it in self.items)

    def scaled(self, factor: float, names: str | Sequence[str] | None = None) -> SteeringSpec:
        """A copy with the strength of the named items (default: all) multiplied by `factor`."""
        factor = check_strength(factor, "factor")
        chosen = self._names(names)
        return SteeringSpec(it.with_strength(it.strength * factor) if it.name in chosen else it for it in self.items)

    def _names(self, names: str | Sequence[str] | None) -> set[str]:
        if names is None:
            return {it.name for it in self.items}
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in {it.name for it in self.items}]
        if unknown:
            raise KeyError(f"no items named {unknown}; items: {[it.name for it in self.items]}")
        return set(names)

    # ------------------------------------------------------------ running

    def edits(self, model: Model) -> list[SiteSteer]:
        """One tracing edit per site (validated against `model` before anything runs)."""
        by_site: dict[Site, list[Item]] = {}
        for it in self.items:
            by_site.setdefault(it.check(model), []).append(it)
        return [SiteSteer(s, tuple(its)) for s, its in sorted(by_site.items(), key=lambda kv: kv[0].order)]

    def run(self, model: Model, inputs: Any, *, capture: Sequence[str] = (), grad: bool = False,
            truncate: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One steered forward pass: (logits, captured activations) as `run_with_edits` returns them.

        A single forward is the prompt pass: "generated" items do nothing here."""
        return run_with_edits(model, inputs, self.edits(model), capture=capture, grad=grad, truncate=truncate)

    def generate(self, model: Model, prompts: str | Sequence[str], *, max_new_tokens: int = 20,
                 min_new_tokens: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                 seed: int | None = None, truncate: bool = False) -> list[str]:
        """Steered continuations (new text only), batched over prompts.

        Runs through PyTorch hooks (`generate_hooked`): the same edits as `toolkit.tracing.generate`, without
        an nnsight trace's per-token cost."""
        return generate_hooked(model, prompts, self.edits(model), max_new_tokens=max_new_tokens,
                               min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature,
                               seed=seed, truncate=truncate)

    # ------------------------------------------------------------ code and items

    def to_code(self, *, inline_vectors: bool = False, prompt: str | None = None, max_new_tokens: int = 20) -> str:
        """Python that, executed, rebuilds this spec as `spec` (and generates for `prompt` if given).

        SAEs are referenced as `saes[<sae_name>]` and vectors as `vectors[<item name>]` (names the caller binds),
        or written out in full with `inline_vectors=True` (exact: float32 values print as exact decimals)."""
        lines = ["from toolkit.analysis.steering import LatentSteer, SteeringSpec, VectorSteer"]
        if inline_vectors and any(isinstance(it, VectorSteer) for it in self.items):
            lines.append("import torch")
        lines += ["", f"spec = {self._expr(inline_vectors)}"]
        if prompt is not None:
            lines.append(f"print(spec.generate(model, [{prompt!r}], max_new_tokens={int(max_new_tokens)})[0])")
        return "\n".join(lines) + "\n"

    def _expr(self, inline_vectors: bool = False) -> str:
        if not self.items:
            return "SteeringSpec([])"
        body = ",\n".join(f"    {_item_code(it, inline_vectors)}" for it in self.items)
        return f"SteeringSpec([\n{body},\n])"

    def __repr__(self) -> str:
        return self._expr()

    def to_items(self) -> list[dict[str, Any]]:
        """Plain dicts for the steering widget (see the data contract); latent items also carry latent/sae/unit."""
        out = []
        for it in self.items:
            lo, hi = _range(it)
            d = {"kind": it.kind, "name": it.name, "site": it.site, "strength": it.strength, "min": lo, "max": hi,
                 "method": it.method, "positions": it.positions, "unit": it.unit}
            if isinstance(it, LatentSteer):
                d.update(latent=it.latent, sae=it.sae_name)
            out.append(d)
        return out

    @classmethod
    def from_items(cls, items: Sequence[Mapping[str, Any]], *, vectors: Mapping[str, torch.Tensor] | None = None,
                   saes: Mapping[str, Any] | Sequence[Any] | None = None) -> SteeringSpec:
        """Rebuild from item dicts: vectors by item name, SAEs by the item's "sae" key or its site."""
        vectors = dict(vectors or {})
        sae_map = _sae_map(saes)
        out: list[Item] = []
        for i, d in enumerate(items):
            kind = d.get("kind")
            common = {"method": d.get("method", "add"), "strength": d.get("strength", 1.0),
                      "positions": d.get("positions", "all"), "name": d.get("name")}
            if kind == "latent":
                key = d.get("sae") or d.get("site")
                sae = sae_map.get(key) or sae_map.get(d.get("site"))
                if sae is None:
                    raise KeyError(f"item {i} ({d.get('name')}) needs SAE {key!r}; given: {sorted(sae_map)}")
                out.append(LatentSteer(sae, _latent_of(d), unit=d.get("unit", 1.0), site=d.get("site"),
                                       sae_name=key, **common))
            elif kind == "vector":
                if d.get("name") not in vectors:
                    raise KeyError(f"item {i} needs vector {d.get('name')!r}; given: {sorted(vectors)}")
                out.append(VectorSteer(vectors[d["name"]], d["site"], unit=d.get("unit"), **common))
            else:
                raise ValueError(f"item {i}: kind must be 'latent' or 'vector', got {kind!r}")
        return cls(out)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write spec.json + vectors.safetensors into `folder` (SAEs are referenced by name, not copied)."""
        from toolkit.analysis.steering.files import save_spec

        return save_spec(self, folder)

    @classmethod
    def load(cls, folder: str | os.PathLike, saes: Mapping[str, Any] | Sequence[Any] | None = None) -> SteeringSpec:
        """Read a folder written by `save`; latent items need their SAEs in `saes`."""
        from toolkit.analysis.steering.files import load_spec

        return load_spec(folder, saes)

    def vectors(self) -> dict[str, torch.Tensor]:
        """{item name: vector} of the vector items (what to_code() and from_items() refer to)."""
        return {it.name: it.vector for it in self.items if isinstance(it, VectorSteer)}

    def saes(self) -> dict[str, Any]:
        """{sae_name: SAE} of the latent items."""
        return {it.sae_name: it.sae for it in self.items if isinstance(it, LatentSteer)}


def _range(it: Item) -> tuple[float, float]:
    from toolkit.analysis.steering.items import DEFAULT_RANGES

    lo, hi = DEFAULT_RANGES[(it.kind, it.method)]
    return min(lo, it.strength), max(hi, it.strength)


def _latent_of(d: Mapping[str, Any]) -> int:
    if "latent" in d:
        return d["latent"]
    name = str(d.get("name", ""))
    tail = name.rsplit("/", 1)[-1]
    if tail.isdigit():
        return int(tail)
    raise ValueError(f"latent item {name!r} has no 'latent' key and its name does not end in /<index>")


def _sae_map(saes: Mapping[str, Any] | Sequence[Any] | None) -> dict[str, Any]:
    if saes is None:
        return {}
    if isinstance(saes, Mapping):
        return dict(saes)
    out = {}
    for sae in saes:
        if sae.cfg.site is None:
            raise ValueError(f"{sae.name} does not know its site; pass saes as a mapping {{name: sae}}")
        out[Site.parse(sae.cfg.site).name] = sae
    return out


def _item_code(it: Item, inline: bool) -> str:
    if isinstance(it, LatentSteer):
        default_name = f"{it.site}/{it.latent}"
        extra = "" if it.name == default_name else f", name={it.name!r}"
        extra += "" if it.sae_name == it.site else f", sae_name={it.sae_name!r}"
        return (f"LatentSteer(saes[{it.sae_name!r}], {it.latent}, {it.method!r}, {it.strength!r}, unit={it.unit!r}, "
                f"positions={it.positions!r}{extra})")
    vec = f"torch.tensor({it.vector.tolist()!r})" if inline else f"vectors[{it.name!r}]"
    return (f"VectorSteer({vec}, {it.site!r}, {it.method!r}, {it.strength!r}, unit={it.unit!r}, "
            f"positions={it.positions!r}, name={it.name!r})")


def require_prompts(prompts: Sequence[str], what: str) -> list[str]:
    """A non-empty list of strings, else EmptyInputError/TypeError naming `what`."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"{what} must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise EmptyInputError(f"{what} is empty: give at least one text")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise EmptyInputError(f"{what} has empty or non-string entries at {bad[:5]}")
    return prompts



