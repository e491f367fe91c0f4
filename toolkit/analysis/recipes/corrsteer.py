"""CorrSteer (Cho et al. 2025): pick SAE latents whose activation correlates with answering correctly, then
steer by adding coefficient x decoder row at the last position.

Per SAE (one per layer), each sample's codes at the last prompt position are correlated (Pearson, streamed in
float64) with correctness; the top positively correlated latent is kept with coefficient = its mean pooled
activation over correct samples (zeros included). Variants: S (the single best latent over all layers), A (one
per layer, all at once), P (a layer's latent kept only if it alone raises validation accuracy). Differences
from the paper, by necessity: answers are one letter, so "generated tokens" are none and pooling reduces to the
last prompt position; correctness is the argmax over the option letters' logits (no sampling).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from toolkit.analysis.table import Table
from toolkit.errors import ArgumentError, EmptyInputError, ShapeMismatchError, check_finite
from toolkit.tracing import Add, capture, run_with_edits

if TYPE_CHECKING:
    from toolkit.models import Model
    from toolkit.sae.sae import SAE

LETTERS = "ABCDEFGH"
FORMAT = "Question: {question}\n{options}\nAnswer:"


def mc_prompt(item: Mapping[str, Any]) -> str:
    """The prompt of a multiple-choice item {question, options, answer}: options lettered A., B., ..."""
    opts = item.get("options") or []
    if not item.get("question") or len(opts) < 2 or item.get("answer") not in LETTERS[:len(opts)]:
        raise ArgumentError(f"an item needs a question, 2+ options and an answer letter among them; got {item!r}")
    return FORMAT.format(question=item["question"], options="\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(opts)))


def _letter_ids(model: Model, n: int) -> list[int]:
    for form in (" {}", "{}"):  # " A" as it follows "Answer:", else the bare letter
        ids = [model.tokenizer.encode(form.format(c), add_special_tokens=False) for c in LETTERS[:n]]
        if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == n:
            return [i[0] for i in ids]
    raise ArgumentError(f"{model.name}'s tokenizer has no single token for each option letter ' A' or 'A'")


def answers(model: Model, items: Sequence[Mapping[str, Any]], edits: Sequence[Add] = (), *,
            batch_size: int = 16) -> np.ndarray:
    """1 where the model's highest-logit option letter (after `edits`) is the item's answer, else 0."""
    if not items:
        raise EmptyInputError("items is empty; give multiple-choice items")
    prompts = [mc_prompt(it) for it in items]
    by_len: dict[int, list[int]] = {}  # same-length prompts batch without padding, so position -1 is every last token
    for i, p in enumerate(prompts):
        by_len.setdefault(len(model.tokenize([p])["input_ids"][0]), []).append(i)
    out = np.zeros(len(items), dtype=int)
    for idx in by_len.values():
        for j in range(0, len(idx), batch_size):
            chunk = idx[j:j + batch_size]
            logits, _ = run_with_edits(model, [prompts[i] for i in chunk], list(edits), logits_to_keep=1)
            for row, i in enumerate(chunk):
                letters = logits[row, -1, _letter_ids(model, len(items[i]["options"]))].float()
                check_finite(letters, "the option letters' logits")
                out[i] = int(LETTERS[int(letters.argmax())] == items[i]["answer"])
    return out


def last_codes(model: Model, sae: SAE, items: Sequence[Mapping[str, Any]], *, batch_size: int = 8) -> torch.Tensor:
    """The SAE's codes at each item's last prompt position, `(n_items, d_sae)` float32."""
    if not items:
        raise EmptyInputError("items is empty; give multiple-choice items")
    s = sae.check_compatible(model).name
    acts = capture(model, [mc_prompt(it) for it in items], s, batch_size=batch_size)
    last = acts[s][torch.arange(len(items)), acts.attention_mask.sum(1) - 1]
    with torch.no_grad():
        return check_finite(sae.encode(last.to(sae.device, sae.dtype)).float().cpu(), f"SAE codes at {s}")


class Pearson:
    """Streaming Pearson correlation of every column of X with y, accumulated in float64."""

    def __init__(self, width: int) -> None:
        self.n, self.sx, self.sxx = 0, np.zeros(width), np.zeros(width)
        self.sy = self.syy = 0.0
        self.sxy = np.zeros(width)

    def update(self, X: Any, y: Any) -> None:
        X = np.asarray(X.cpu() if isinstance(X, torch.Tensor) else X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.sx) or y.shape != (len(X),):
            raise ShapeMismatchError(f"need X (n, {len(self.sx)}) and y (n,); got {X.shape} and {y.shape}")
        check_finite(X, "the codes given to the correlation")
        check_finite(y, "the labels given to the correlation")
        self.n += len(X)
        self.sx += X.sum(0)
        self.sxx += (X * X).sum(0)
        self.sy += float(y.sum())
        self.syy += float((y * y).sum())
        self.sxy += X.T @ y

    def result(self) -> np.ndarray:
        """Correlations (width,); 0 where a latent or the labels never vary."""
        if self.n < 2:
            raise EmptyInputError(f"correlation needs at least 2 samples, got {self.n}")
        cov = self.sxy / self.n - (self.sx / self.n) * (self.sy / self.n)
        vx = self.sxx / self.n - (self.sx / self.n) ** 2
        vy = self.syy / self.n - (self.sy / self.n) ** 2
        if vy <= 0:
            raise ArgumentError("every sample has the same correctness (one class); correlation needs both")
        with np.errstate(divide="ignore", invalid="ignore"):
            r = cov / np.sqrt(vx * vy)
        return np.where(vx > 1e-12, r, 0.0)


@dataclass(frozen=True)
class Pick:
    """One selected latent: its SAE, index, correlation and steering coefficient."""

    sae: Any
    latent: int
    corr: float
    coefficient: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "latent", self.sae.check_feature(self.latent))
        check_finite(torch.tensor(self.coefficient), f"the coefficient of latent {self.latent}")

    def edit(self, scale: float = 1.0) -> Add:
        """Add scale x coefficient x decoder row (activation units) at the last prompt position."""
        row = (self.sae.W_dec[self.latent] / self.sae.input_scale).detach().float().cpu()
        return Add(self.sae.cfg.site, row, scale=float(scale * self.coefficient), positions=-1)


def select(codes: torch.Tensor, correct: Any, sae: SAE, *, negative: bool = False) -> Pick:
    """The latent most positively (or, `negative`, most negatively) correlated with `correct`; coefficient =
    its mean activation over correct samples, zeros included (for `negative`: over incorrect samples)."""
    y = np.asarray(correct)
    if codes.ndim != 2 or codes.shape[1] != sae.d_sae or len(y) != codes.shape[0]:
        raise ShapeMismatchError(f"codes must be (n, {sae.d_sae}) with one label per row; got "
                                 f"{tuple(codes.shape)} and {y.shape}")
    p = Pearson(sae.d_sae)
    p.update(codes, y)
    r = p.result()
    i = int(np.argmin(r) if negative else np.argmax(r))
    rows = codes[torch.as_tensor(y == (0 if negative else 1))]
    return Pick(sae, i, float(r[i]), float(rows[:, i].mean()) if len(rows) else 0.0)


def random_pick(pick: Pick, *, seed: int = 0) -> Pick:
    """A control: another latent of the same SAE at the same coefficient."""
    g = np.random.default_rng(seed)
    i = int(g.integers(pick.sae.d_sae - 1))
    return Pick(pick.sae, i + (i >= pick.latent), 0.0, pick.coefficient)


def prune(model: Model, picks: Sequence[Pick], items: Sequence[Mapping[str, Any]], baseline: float) -> list[Pick]:
    """Variant P: keep each layer's pick only if steering with it alone beats `baseline` accuracy on `items`."""
    return [p for p in picks if answers(model, items, [p.edit()]).mean() > baseline]


def accuracy_table(model: Model, items: Sequence[Mapping[str, Any]], conditions: Mapping[str, Sequence[Add]]) -> Table:
    """Accuracy on `items` under each named list of edits (columns condition, accuracy, n)."""
    if not conditions:
        raise EmptyInputError("conditions is empty; give {name: [edits]} (an empty list is the baseline)")
    return Table([{"condition": k, "accuracy": float(answers(model, items, v).mean()), "n": len(items)}
                  for k, v in conditions.items()])


def corrsteer_data() -> list[dict[str, Any]]:
    """The 157 hand-written three-option items."""
    from toolkit.analysis.recipes._data import load_data

    return load_data("corrsteer")["items"]
