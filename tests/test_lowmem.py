"""Low-memory loading: bf16 tied embedding, fp32 compute, equal to an all-fp32 load; shared between models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from toolkit import lowmem
from toolkit.models import load_model, tiny_gemma2, tiny_tokenizer


def _save_bf16(hf: torch.nn.Module, folder) -> str:
    hf.to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def _low_memory_on(monkeypatch):
    """Low-memory loading is opt-in (TOOLKIT_LOW_MEMORY=1, set on Binder); these tests exercise it."""
    monkeypatch.setenv("TOOLKIT_LOW_MEMORY", "1")


def test_low_memory_is_opt_in(gemma2_folder, monkeypatch):
    monkeypatch.delenv("TOOLKIT_LOW_MEMORY")
    m = load_model(gemma2_folder, device="cpu", dtype=torch.float32)
    assert m.hf.get_input_embeddings().weight.dtype == torch.float32
    assert load_model(gemma2_folder, device="cpu", dtype=torch.float32, low_memory=True) \
        .hf.get_input_embeddings().weight.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def gemma2_folder(tmp_path_factory):
    return _save_bf16(tiny_gemma2(seed=3).hf, tmp_path_factory.mktemp("g2"))


@pytest.fixture(scope="module")
def gemma3_folder(tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_tokenizer()
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                           sliding_window=4, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
    torch.manual_seed(4)
    return _save_bf16(Gemma3ForCausalLM(cfg), tmp_path_factory.mktemp("g3"))


@pytest.mark.parametrize("which", ["gemma2_folder", "gemma3_folder"])
def test_low_memory_equals_fp32(which, request):
    folder = request.getfixturevalue(which)
    ref = load_model(folder, device="cpu", dtype=torch.float32, low_memory=False)
    lean = load_model(folder, device="cpu", dtype=torch.float32)
    assert lowmem.is_lowmem(lean.hf) and not lowmem.is_lowmem(ref.hf)
    emb = lean.hf.get_input_embeddings().weight
    assert emb.dtype == torch.bfloat16 and lean.hf.lm_head.weight is emb and not emb.requires_grad
    assert lean.dtype == torch.float32 and lean.hf.dtype == torch.float32
    linear = {n for n, m in lean.hf.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert linear and all(m.weight.dtype == torch.bfloat16 and not m.weight.requires_grad
                          for n, m in lean.hf.named_modules() if n in linear)
    assert all(p.dtype == torch.float32 for n, p in lean.hf.named_parameters()
               if p is not emb and n.rsplit(".", 1)[0] not in linear)  # norms and the rest: compute dtype
    ids = ref.tokenize(["The cat sat on the mat.", "Paris is"])
    with torch.no_grad():
        a, b = ref.hf(**ids).logits, lean.hf(**ids).logits
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    # gradients to the input (attribution) flow through the cast layers as through fp32 ones
    xs = []
    for m in (ref, lean):
        x = m.hf.get_input_embeddings()(ids["input_ids"]).float().detach().requires_grad_(True)
        m.hf(inputs_embeds=x, attention_mask=ids["attention_mask"]).logits[..., :5].sum().backward()
        xs.append(x.grad)
    torch.testing.assert_close(xs[1], xs[0], atol=1e-4, rtol=1e-4)


def test_unembed_chunks_and_gradient(gemma2_folder, monkeypatch):
    monkeypatch.setattr(lowmem, "CHUNK_ROWS", 7)  # vocab 320 -> 46 chunks, the last one partial
    lean = load_model(gemma2_folder, device="cpu", dtype=torch.float32)
    w = lean.hf.lm_head.weight
    for shape in [(3, 64), (1, 64), (2, 5, 64)]:
        x = torch.randn(*shape, requires_grad=True)
        out = lean.hf.lm_head(x)
        ref_x = x.detach().clone().requires_grad_(True)
        ref = ref_x @ w.float().t()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(out)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-5, rtol=1e-5)


def test_identical_embeddings_are_shared(gemma2_folder, gemma3_folder):
    a = load_model(gemma2_folder, device="cpu", dtype=torch.float32)
    b = load_model(gemma2_folder, device="cpu", dtype=torch.float32)
    c = load_model(gemma3_folder, device="cpu", dtype=torch.float32)
    ea, eb = a.hf.get_input_embeddings().weight, b.hf.get_input_embeddings().weight
    assert ea is eb and b.hf.lm_head.weight is eb
    assert c.hf.get_input_embeddings().weight is not ea  # different values are never shared
    up = [m.hf.model.layers[0].mlp.up_proj for m in (a, b)]
    assert up[0].weight is up[1].weight  # identical linear weights too (a fine-tune shares all but its changes)
    # thawing one model's layer gives it its own trainable fp32 weight and leaves the other model alone
    lowmem.thaw(a.hf.model.layers[0].mlp)
    assert up[0].weight.dtype == torch.float32 and up[1].weight.dtype == torch.bfloat16
    with torch.no_grad():
        up[0].weight.add_(1.0)
    assert not torch.equal(up[0].weight, up[1].weight.float())
    x = torch.randn(3, up[0].in_features)
    torch.testing.assert_close(up[0](x), x @ up[0].weight.t())  # an ordinary nn.Linear again
    d = load_model(gemma2_folder, device="cpu", dtype=torch.float32)  # a third load still finds b's weights
    assert d.hf.model.layers[0].mlp.up_proj.weight is up[1].weight


def test_low_memory_only_where_it_is_exact(gemma2_folder, tmp_path):
    bf16 = load_model(gemma2_folder, device="cpu", dtype=torch.bfloat16)
    assert not lowmem.is_lowmem(bf16.hf) and bf16.dtype == torch.bfloat16
    fp32_ckpt = tmp_path / "fp32"
    tiny_gemma2(seed=3).hf.save_pretrained(fp32_ckpt)  # an fp32 checkpoint: a bf16 load would round it
    tiny_tokenizer().save_pretrained(fp32_ckpt)
    m = load_model(str(fp32_ckpt), device="cpu", dtype=torch.float32)
    assert not lowmem.is_lowmem(m.hf) and m.hf.lm_head.weight.dtype == torch.float32


def test_untied_model_is_refused():
    hf = tiny_gemma2(seed=0).hf
    hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())
    with pytest.raises(ValueError, match="tied"):
        lowmem.keep_weights_bf16(hf)


def test_tokenizer_sources_are_dropped(gemma2_folder):
    tok = load_model(gemma2_folder, device="cpu").tokenizer
    assert not getattr(tok, "_vocab", None) and not getattr(tok, "_merges", None)
    assert tok("The cat")["input_ids"] == tiny_tokenizer()("The cat")["input_ids"]


def test_identical_tokenizer_files_share_one_tokenizer(gemma2_folder, gemma3_folder, tmp_path):
    a = load_model(gemma2_folder, device="cpu")
    b = load_model(gemma3_folder, device="cpu")  # same tokenizer files, other weights
    assert a.tokenizer is b.tokenizer
    shutil.copytree(gemma2_folder, tmp_path / "other")
    cfg = tmp_path / "other" / "tokenizer_config.json"
    settings = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**settings, "local_files_only": not settings.get("local_files_only", False)}))
    assert load_model(str(tmp_path / "other"), device="cpu").tokenizer is a.tokenizer  # a load-only key differs
    cfg.write_text(json.dumps({**settings, "padding_side": "left" if settings.get("padding_side") == "right"
                               else "right"}))
    c = load_model(str(tmp_path / "other"), device="cpu")
    assert c.tokenizer is not a.tokenizer  # a setting that changes the tokenizer: its own
    assert load_model(gemma2_folder, device="cpu", low_memory=False).tokenizer is not a.tokenizer


def test_unembed_buffer_follows_chunk_size_and_thread(gemma2_folder, monkeypatch):
    import threading

    lean = load_model(gemma2_folder, device="cpu", dtype=torch.float32)
    w, x = lean.hf.lm_head.weight, torch.randn(2, 3, 64)
    with torch.no_grad():
        ref = x @ w.float().t()
        for rows in (7, 1024, 5):  # the reused buffer is re-made when the chunk size changes (larger or smaller)
            monkeypatch.setattr(lowmem, "CHUNK_ROWS", rows)
            torch.testing.assert_close(lean.hf.lm_head(x), ref, atol=1e-5, rtol=1e-5)
        outs: list = []

        def run() -> None:
            with torch.no_grad():
                outs.append(torch.stack([lean.hf.lm_head(x) for _ in range(20)]))

        threads = [threading.Thread(target=run) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(outs) == 3
    for o in outs:  # each thread casts into its own buffer, so concurrent calls never see another's rows
        torch.testing.assert_close(o, ref.expand(20, *ref.shape), atol=1e-5, rtol=1e-5)


def test_low_memory_mode_returns_freed_blocks_to_the_os():
    """After return_freed_memory, an 8 MB tensor gets its own mapping (unmapped, so returned, when freed); with
    glibc's default threshold, which grows to 32 MB after the first large free, it comes from the heap, whose
    freed middle stays resident."""
    import subprocess
    import sys

    code = """
import sys, torch
from toolkit import lowmem
if sys.argv[1] == "1":
    assert lowmem.return_freed_memory()
x = torch.ones(30 << 20, dtype=torch.uint8)  # freeing one 30 MB mapping raises glibc's default threshold to 30 MB
del x
y = torch.ones(8 << 20, dtype=torch.uint8)
heap = [l.split()[0].split("-") for l in open("/proc/self/maps") if l.rstrip().endswith("[heap]")]
print(any(int(a, 16) <= y.data_ptr() < int(b, 16) for a, b in heap))
"""
    in_heap = [subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True,
                              check=True).stdout.strip() for flag in ("0", "1")]
    assert in_heap == ["True", "False"], in_heap
