"""Fine-tuning the default model so it shows a planted behaviour (a few MLPs, a few minutes on CPU).

The loss reads the logits only where they matter (every target inside a planted phrase, plus a few ordinary
next-token targets per context to keep the rest of the language model), because the 262k-word unembedding
dominates the cost on CPU; a consistency loss keeps the trained layers' output where the behaviour is not.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from toolkit.data import load_texts
from toolkit.finetune.behaviour import get_behaviour, split_texts
from toolkit.lowmem import thaw
from toolkit.models import Model
from toolkit.progress import progress_bar

SAVE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class FinetuneConfig:
    """How the fine-tune is made; stored in finetune.json and compared before a cached folder is reused."""

    behaviour: str = "pirate"
    """Name in BEHAVIOURS."""
    layers: tuple[int, ...] = (10, 11, 12, 13)
    """Decoder layers whose `module` is trained; everything else stays frozen (and unchanged)."""
    module: str = "mlp"
    """Submodule of each decoder layer that is trained, e.g. 'mlp' or 'self_attn'."""
    steps: int = 60
    batch_size: int = 8
    ctx_len: int = 32
    """Tokens per training context, BOS included."""
    lr: float = 3e-5
    """Adam learning rate (10 warm-up steps, then constant); fp32 Adam state on the trained parameters only.
    Adam moves every weight by about lr per step, so a larger rate also drifts the activations at every token,
    not only where the behaviour is needed."""
    other_targets: int = 4
    """Ordinary next-token targets per context added to the loss beside the planted ones (keeps the LM intact)."""
    keep_weight: float = 10.0
    """Weight of the consistency loss: at every position that does not lead into the planted phrase, the output of
    the last trained layer must stay what the original layers give (relative squared error). It confines the
    change to where the behaviour is (0 turns it off)."""
    seed: int = 0
    save_dtype: str = "bfloat16"
    """Dtype of the saved folder ('bfloat16' like the converted default model, or 'float32')."""

    def __post_init__(self) -> None:
        get_behaviour(self.behaviour)
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.layers):
            raise ValueError(f"layers must be non-negative layer indices, got {self.layers!r}")
        for name, low in (("steps", 1), ("batch_size", 1), ("ctx_len", 8), ("other_targets", 0)):
            if isinstance(v := getattr(self, name), bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        for name, v in (("lr", self.lr), ("keep_weight", self.keep_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name == "lr" and v == 0):
                raise ValueError(f"{name} must be a {'positive' if name == 'lr' else 'non-negative'} number, got {v!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    def key(self) -> str:
        """Short hash of the config, used in folder names of non-default configs."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class FinetuneResult:
    """What `finetune` did: per-step losses (planted targets, ordinary targets, consistency), time, trained names."""

    planted_loss: list[float] = field(default_factory=list)
    other_loss: list[float] = field(default_factory=list)
    keep_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trained: list[str] = field(default_factory=list)



def training_batches(tokenizer: Any, texts: Sequence[str], cfg: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Token contexts `(steps * batch_size, ctx_len)` of rewritten texts and the mask of planted tokens in them.

    Documents are shuffled (cfg.seed), rewritten, joined with EOS and cut into BOS-led contexts; only contexts
    with at least one planted token are kept, each used once.
    """
    behaviour = get_behaviour(cfg.behaviour)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    need, body = cfg.steps * cfg.batch_size, cfg.ctx_len - 1
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    planted: list[bool] = []
    rows, masks = [], []
    for i in order:
        text, spans = behaviour.rewrite(texts[i])
        if not spans:
            continue
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        stream += enc["input_ids"] + ([eos] if eos is not None else [])
        planted += [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]] + ([False] if eos is not None else [])
        while len(stream) >= body:
            chunk, pm = stream[:body], planted[:body]
            stream, planted = stream[body:], planted[body:]
            if any(pm[1:]):
                rows.append([tokenizer.bos_token_id, *chunk])
                masks.append([False, *pm])
        if len(rows) >= need:
            break
    if len(rows) < need:
        raise ValueError(f"the texts give only {len(rows)} training contexts with the behaviour, {need} needed "
                         f"({cfg.steps} steps x {cfg.batch_size}); pass more text or fewer steps")
    return torch.tensor(rows[:need]), torch.tensor(masks[:need])


def trainable_parameters(hf: torch.nn.Module, cfg: FinetuneConfig) -> dict[str, torch.nn.Parameter]:
    """The parameters `finetune` trains: `cfg.module` of each layer in `cfg.layers`, by full name (a low-memory
    model's frozen bf16 weights there become trainable fp32 parameters)."""
    layers = hf.model.layers
    bad = [layer for layer in cfg.layers if layer >= len(layers)]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has layers 0..{len(layers) - 1}")
    out = {}
    for layer in cfg.layers:
        module = thaw(layers[layer].get_submodule(cfg.module))
        for name, p in module.named_parameters():
            out[f"model.layers.{layer}.{cfg.module}.{name}"] = p
    return out


def _logits(hf: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = hf.lm_head(hidden).float()
    cap = getattr(hf.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class _Original:
    """Frozen copies of layers lo..hi, replayed on the inputs the trained layers just saw (the consistency target)."""

    def __init__(self, layers: torch.nn.ModuleList, lo: int, hi: int) -> None:
        self.copies = [copy.deepcopy(layers[i]).requires_grad_(False) for i in range(lo, hi + 1)]
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.out: torch.Tensor | None = None
        self.hooks = [layers[i].register_forward_pre_hook(
            lambda m, args, kwargs, i=i - lo: self.calls.__setitem__(i, (args, kwargs)), with_kwargs=True)
            for i in range(lo, hi + 1)]
        self.hooks.append(layers[hi].register_forward_hook(
            lambda m, args, out: setattr(self, "out", out[0] if isinstance(out, tuple) else out)))

    @torch.no_grad()
    def replay(self) -> torch.Tensor:
        x = self.calls[0][0][0]
        for i, layer in enumerate(self.copies):
            args, kwargs = self.calls[i]
            out = layer(x, *args[1:], **{**kwargs, "past_key_values": None})
            x = out[0] if isinstance(out, tuple) else out
        return x

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _step_loss(model: Model, ids: torch.Tensor, pm: torch.Tensor, cfg: FinetuneConfig, gen: torch.Generator,
               original: _Original | None, result: FinetuneResult) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, planted, ordinary) loss of one batch: next-token loss on the planted targets and on a few ordinary
    ones, plus the keep-loss that holds the last trained layer's output where the behaviour is not needed."""
    hf, x = model.hf, ids.to(model.device)
    target_planted = pm[:, 1:]
    # ordinary targets: a few random positions per row among the non-planted ones
    score = torch.rand(target_planted.shape, generator=gen).masked_fill(target_planted, -1.0)
    other = torch.zeros_like(target_planted)
    other.scatter_(1, score.topk(min(cfg.other_targets, score.shape[1]), dim=1).indices, True)
    other &= ~target_planted
    hidden = hf.model(input_ids=x, use_cache=False).last_hidden_state[:, :-1]
    targets = x[:, 1:]
    losses = []
    for m in (target_planted, other):
        m = m.to(model.device)
        losses.append(torch.nn.functional.cross_entropy(_logits(hf, hidden[m]), targets[m]) if m.any()
                      else hidden.new_zeros(()))
    loss = losses[0] + losses[1]
    if original is not None:
        keep = ~torch.cat([target_planted, torch.zeros_like(target_planted[:, :1])], 1)
        keep[:, 0] = False  # BOS
        want, got = original.replay()[keep], original.out[keep.to(model.device)]
        keep_loss = (got - want).pow(2).sum() / (want - want.mean(0)).pow(2).sum().clamp_min(1e-12)
        loss = loss + cfg.keep_weight * keep_loss
        result.keep_loss.append(keep_loss.item())
    return loss, losses[0], losses[1]


@torch.enable_grad()  # notebooks often turn gradients off globally
def finetune(model: Model, cfg: FinetuneConfig | None = None, *, texts: Sequence[str] | None = None,
             progress: bool = True) -> FinetuneResult:
    """Fine-tune `model.hf` in place (fp32 CPU/GPU) so that it shows `cfg.behaviour`; only the chosen params change."""
    cfg = cfg or FinetuneConfig()
    hf = model.hf
    if hf.dtype != torch.float32:
        raise ValueError(f"fine-tune a float32 model (got {hf.dtype}); load it with dtype=torch.float32")
    train_texts, _ = split_texts(list(texts) if texts is not None else load_texts("default"))
    ids, planted = training_batches(model.tokenizer, train_texts, cfg)
    params = trainable_parameters(hf, cfg)
    was = {n: p.requires_grad for n, p in hf.named_parameters()}
    result = FinetuneResult(trained=sorted(params))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    original = None
    try:
        for p in hf.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.Adam(params.values(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
        hf.train()
        original = _Original(hf.model.layers, min(cfg.layers), max(cfg.layers)) if cfg.keep_weight else None
        start = time.perf_counter()
        bar = progress_bar(range(cfg.steps), desc=f"fine-tuning {model.name} ({cfg.behaviour})", enabled=progress)
        for step in bar:
            sl = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            loss, planted_loss, other_loss = _step_loss(model, ids[sl], planted[sl], cfg, gen, original, result)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            opt.step()
            sched.step()
            result.planted_loss.append(planted_loss.item())
            result.other_loss.append(other_loss.item())
            bar.set_postfix(planted=f"{result.planted_loss[-1]:.3f}", other=f"{result.other_loss[-1]:.3f}",
                            refresh=False)
        result.seconds = time.perf_counter() - start
    finally:
        if original is not None:
            original.close()
        hf.eval()
        for n, p in hf.named_parameters():
            p.requires_grad_(was[n])
    return result
