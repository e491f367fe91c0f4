"""HierarchicalTopK and AdaptiveK against TopK and BatchTopK, side by side on the same activations.

Default model (Gemma 3 270M), layer 6 residual stream, the cached activations of tutorial 02 (512 contexts of the
offline corpus); every SAE has the same width, steps, batch size, learning rate and batch order. Evaluation is
plain inference on 64 held-out contexts no SAE trained on.

1. HierarchicalTopK (K = 32) at k' in {4, 8, 16, 32} vs TopK trained at each k' vs TopK-32 truncated to k'
   (Balagansky et al.: one HierarchicalTopK SAE is close to the per-k TopK SAEs and far better than truncation).
2. AdaptiveK (k from 4 to 32, probe fitted on the text-complexity proxy of toolkit.training.complexity) vs TopK
   and BatchTopK trained at AdaptiveK's realised mean L0 (Yao et al.: better reconstruction at equal mean L0),
   and the correlation of AdaptiveK's k with the proxy on held-out text.
3. Dead-latent fractions and training tokens/s of every SAE.

    flock /work/locks/real.lock .venv/bin/python benchmarks/sae_variants.py            # ~6-8 min on 2 cores
    flock /work/locks/real.lock .venv/bin/python benchmarks/sae_variants.py --steps 20 # smoke run
"""

from __future__ import annotations

import argparse
import time

import torch

from toolkit.config import SAEConfig, TrainConfig
from toolkit.data import load_texts, token_contexts
from toolkit.models import load_model
from toolkit.sae import SAE
from toolkit.tracing import iter_capture
from toolkit.training.complexity import complexity_examples, fit_probe, text_complexity
from toolkit.training.sae_trainer import train_sae
from toolkit.training.zoo import CorpusSpec, corpus_activations

SITE = "blocks.6.resid_post"
BUDGETS = (4, 8, 16, 32)


def fvu_l0(sae: SAE, x: torch.Tensor, k: int | None = None) -> tuple[float, float]:
    with torch.no_grad():
        out = sae(x, k=k)
    fvu = float((x - out.reconstruction).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return fvu, float((out.codes != 0).sum(-1).float().mean())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    rank = lambda t: t.double().argsort().argsort().double()  # noqa: E731
    return float(torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1])


def recipe(arch: str, a: argparse.Namespace, **sae_kw) -> TrainConfig:
    """One recipe for every SAE (tutorial 02's for the top-k family); only the architecture and budget differ."""
    sae = SAEConfig(640, a.width, arch, site=SITE, model="default", **sae_kw)
    return TrainConfig(sae=sae, lr=1e-3, batch_size=a.batch, total_steps=a.steps, warmup_steps=a.steps // 20,
                       log_every=10, dead_after_tokens=50 * a.batch, seed=a.seed)


def held_out(model, corpus: CorpusSpec, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(contexts (n, ctx), all non-BOS activations (n·(ctx-1), d), activations (n, ctx, d))."""
    ctx = token_contexts(model.tokenizer, load_texts(corpus.source), corpus.ctx_len,
                         n_contexts=corpus.n_contexts + n)[-n:]
    with torch.no_grad():
        acts = torch.cat([a[SITE].float() for _, a in iter_capture(model, ctx, SITE, progress=False)])
    return ctx, acts[:, 1:].reshape(-1, acts.shape[-1]), acts


def train(name: str, cfg: TrainConfig, cache, results: dict, x: torch.Tensor, **kw) -> SAE:
    res = train_sae(cfg, cache, progress=False, **kw)
    fvu, l0 = fvu_l0(res.sae, x)
    results[name] = {"fvu": fvu, "l0": l0, "dead": res.history[-1]["dead_fraction"], "tok_s": res.tokens_per_s}
    print(f"  trained {name:22s} FVU {fvu:.4f}  L0 {l0:5.1f}  dead {res.history[-1]['dead_fraction']:6.1%}  "
          f"{res.tokens_per_s:8,.0f} tok/s", flush=True)
    return res.sae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--k-min", type=int, default=4)
    p.add_argument("--held-out", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model = load_model("default")
    corpus = CorpusSpec(n_contexts=512)
    cache = corpus_activations(model, SITE, corpus, progress=False)
    contexts = corpus.contexts(model)
    h_ctx, x_test, h_acts = held_out(model, corpus, a.held_out)
    data, _ = complexity_examples(cache, contexts, model.tokenizer, every=16)
    print(f"{cache.n_tokens:,} training tokens, {x_test.shape[0]:,} held-out tokens, {len(data):,} complexity "
          f"examples; {a.steps} steps of {a.batch} tokens, {a.width} latents ({time.perf_counter() - t0:.0f} s)")

    r: dict[str, dict] = {}
    K = BUDGETS[-1]
    hier = train("hierarchical_topk K=32", recipe("hierarchical_topk", a, k=K), cache, r, x_test)
    topk = {k: train(f"topk k={k}", recipe("topk", a, k=k), cache, r, x_test) for k in BUDGETS}
    adaptive = train(f"adaptivek k={a.k_min}..{K}", recipe("adaptivek", a, k=K, k_min=a.k_min), cache, r, x_test,
                     complexity=data)
    k_eq = max(1, round(r[f"adaptivek k={a.k_min}..{K}"]["l0"]))
    if k_eq not in BUDGETS:
        topk[k_eq] = train(f"topk k={k_eq}", recipe("topk", a, k=k_eq), cache, r, x_test)
    train(f"batchtopk k={k_eq}", recipe("batchtopk", a, k=k_eq), cache, r, x_test)
    report(a, r, hier, topk, adaptive, k_eq, x_test, h_ctx, h_acts, data, model)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


def report(a, r, hier, topk, adaptive, k_eq, x_test, h_ctx, h_acts, data, model) -> None:
    K = BUDGETS[-1]
    print("\n1. FVU at k' (held-out): one HierarchicalTopK SAE vs a TopK SAE per k' vs TopK-32 truncated")
    print(f"{'k':>4} {'hier K=32':>10} {'TopK@k':>8} {'TopK-32 trunc':>14} {'hier/TopK@k':>12} {'hier/trunc':>11}")
    for k in BUDGETS:
        h, t, tr = fvu_l0(hier, x_test, k)[0], r[f"topk k={k}"]["fvu"], fvu_l0(topk[K], x_test, k)[0]
        print(f"{k:4d} {h:10.4f} {t:8.4f} {tr:14.4f} {h / t:12.3f} {h / tr:11.3f}")

    name = f"adaptivek k={a.k_min}..{K}"
    print(f"\n2. At AdaptiveK's realised mean L0 ({r[name]['l0']:.2f}; TopK/BatchTopK trained at k={k_eq})")
    print(f"{'SAE':26s} {'L0':>6} {'FVU':>8} {'FVU / AdaptiveK':>16}")
    for n in (name, f"topk k={k_eq}", f"batchtopk k={k_eq}"):
        print(f"{n:26s} {r[n]['l0']:6.2f} {r[n]['fvu']:8.4f} {r[n]['fvu'] / r[name]['fvu']:16.3f}")
    complexity_report(a, adaptive, h_ctx, h_acts, data, model)

    print(f"\n3. {'SAE':26s} {'dead':>7} {'tokens/s':>10} {'vs TopK@32':>11}")
    base = r[f"topk k={K}"]["tok_s"]
    for n, v in r.items():
        print(f"   {n:26s} {v['dead']:7.1%} {v['tok_s']:10,.0f} {v['tok_s'] / base:11.2f}")


def complexity_report(a, adaptive: SAE, h_ctx, h_acts, data, model) -> None:
    """Correlation of AdaptiveK's k with the text-complexity proxy on held-out text (every 16th position and the
    last), overall and at the last position only (so the position itself cannot carry it)."""
    ctx_len = h_ctx.shape[1]
    pos = [p for p in range(1, ctx_len) if p % 16 == 0 or p == ctx_len - 1]
    rows = [(c, p) for c in range(h_ctx.shape[0]) for p in pos]
    texts = model.tokenizer.batch_decode([h_ctx[c, 1:p + 1].tolist() for c, p in rows])
    proxy = text_complexity(texts, model.tokenizer)
    x = torch.stack([h_acts[c, p] for c, p in rows])
    with torch.no_grad():
        k, s = adaptive.budget(x), adaptive.complexity(x)
    last = torch.tensor([p == ctx_len - 1 for _, p in rows])
    fit = fit_probe(data, (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0), seed=a.seed)
    print(f"   complexity probe: ridge λ={fit.penalty:g} by 5-fold CV, CV RMSE {fit.cv_rmse:.3f} "
          f"(scores uniform in [0, 1]: RMSE of a constant 0.289)")
    print(f"   held-out ({len(rows)} prefixes): Spearman(k, proxy) = {spearman(k, proxy):.3f}, "
          f"Spearman(probe s, proxy) = {spearman(s, proxy):.3f}; at the last position only "
          f"({int(last.sum())}): Spearman(k, proxy) = {spearman(k[last], proxy[last]):.3f}")
    print(f"   k on held-out: min {int(k.min())}, mean {float(k.float().mean()):.2f}, max {int(k.max())}")


if __name__ == "__main__":
    main()
