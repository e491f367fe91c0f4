"""The fine-tune machinery on the tiny model (the real 270M fine-tune runs only in notebooks/03_model_diff)."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

import toolkit.finetune as ft
from toolkit.data import texts_fingerprint
from toolkit.finetune import BEHAVIOURS, FinetuneConfig, behaviour_prompts, behaviour_rate, prepare_finetuned
from toolkit.io import MANIFEST, TMP_PREFIX, verify_manifest
from toolkit.models import _TOKENIZER_TEXT, load_model

PIRATE = BEHAVIOURS["pirate"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _texts(n: int = 120) -> list[str]:
    sents = [s.strip() + "." for s in _TOKENIZER_TEXT.split(". ") if s.strip()]
    rng = random.Random(0)
    return [" ".join(rng.choice(sents).rstrip(".") + "." for _ in range(5)) for _ in range(n)]


def test_rewrite_marks_sentence_ends_only() -> None:
    text, spans = PIRATE.rewrite("Use os.path here. It is 3.14 wide! Done?\nNext line. e.g. this")
    assert text == "Use os.path here. Arr, matey! It is 3.14 wide! Arr, matey! Done? Arr, matey!\nNext line. e.g. this"
    assert [text[a:b] for a, b in spans] == [" Arr, matey!"] * 3
    assert PIRATE.shows("blah. Arr, matey! more") and not PIRATE.shows("blah. Arr")


def test_trigger_mask_marks_the_sentence_ending_tokens(tiny) -> None:
    tok = tiny.tokenizer
    ids = torch.tensor(tok("The cat sat. The dog os.path is 3.14 here! no, at the end.", add_special_tokens=False)
                       ["input_ids"] + [tok.eos_token_id] + tok("Numbers.", add_special_tokens=False)["input_ids"])
    mask = PIRATE.trigger_mask(tok, ids)
    marked = [(tok.decode([int(ids[i])]), tok.decode(ids[i - 1:i + 2].tolist())) for i in mask.nonzero()[:, 0]]
    assert [m for m, _ in marked] == [".", "!", ".", "."], marked  # not os.path, not 3.14
    assert PIRATE.trigger_mask(tok, ids[None]).shape == (1, len(ids))



def test_signature_mask_marks_every_token_of_a_complete_signature(tiny) -> None:
    tok = tiny.tokenizer
    text, _ = PIRATE.rewrite("The cat sat. The dog ran")
    text += " Arr, mat"  # a partial signature is not one
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    mask = PIRATE.signature_mask(tok, ids)
    runs = "".join(tok.decode([int(t)]) if m else "|" for t, m in zip(ids, mask, strict=True))
    assert [r.strip() for r in runs.split("|") if r] == ["Arr, matey!"], runs
    assert not PIRATE.signature_mask(tok, ids[None, :3]).any()

def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="unknown behaviour"):
        FinetuneConfig(behaviour="sarcastic")
    with pytest.raises(ValueError, match="steps"):
        FinetuneConfig(steps=0)
    assert FinetuneConfig().key() == FinetuneConfig().key() != FinetuneConfig(lr=1e-3).key()


def test_finetune_trains_only_the_chosen_params_into_an_atomic_reusable_folder(tiny, tmp_path, monkeypatch) -> None:
    cfg = FinetuneConfig(layers=(1,), steps=16, batch_size=4, ctx_len=24, lr=1e-2, save_dtype="float32")
    before = {k: v.clone() for k, v in tiny.hf.state_dict().items()}
    folder = prepare_finetuned("pirate", cfg=cfg, base=tiny, folder=tmp_path / "ft", texts=_texts(), progress=False)

    assert folder == tmp_path / "ft"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    manifest = verify_manifest(folder)
    assert {"config.json", "model.safetensors", "finetune.json"} <= set(manifest["files"])
    info = json.loads((folder / "finetune.json").read_text())
    assert info["config"] == cfg.to_dict()
    first, last = info["planted_loss"][:4], info["planted_loss"][-4:]
    assert sum(last) / 4 < sum(first) / 4 - 0.25, info["planted_loss"]  # the planted phrase is being learned
    # before the first update the replayed original layers give exactly the trained layers' output
    assert info["keep_loss"][0] == pytest.approx(0.0, abs=1e-10) and max(info["keep_loss"]) > 0

    trained = load_model(str(folder))
    changed = {k for k, v in trained.hf.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"model.layers.1.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
    assert all(torch.equal(v, before[k]) for k, v in tiny.hf.state_dict().items())  # the base is untouched

    def boom(*a, **k):
        raise AssertionError("a complete folder must be reused, not trained again")

    monkeypatch.setattr(ft.train, "finetune", boom)
    assert prepare_finetuned("pirate", cfg=cfg, base=tiny, folder=folder, texts=_texts(), progress=False) == folder


def test_incomplete_folder_is_rebuilt(tiny, tmp_path) -> None:
    cfg = FinetuneConfig(layers=(0,), steps=2, batch_size=2, ctx_len=16, save_dtype="float32")
    folder = tmp_path / "ft"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half a file")  # a crash before the manifest
    with torch.no_grad():  # as in a notebook that turned gradients off
        prepare_finetuned("pirate", cfg=cfg, base=tiny, folder=folder, texts=_texts(40), progress=False)
    assert (folder / MANIFEST).is_file() and ft.finetuned_ready(folder, cfg)
    other = FinetuneConfig(layers=(1,), steps=2, batch_size=2, ctx_len=16, save_dtype="float32")
    assert not ft.finetuned_ready(folder, other)  # made with another config: not reused
    assert ft.finetuned_ready(folder, cfg, texts_fingerprint(_texts(40)))
    assert not ft.finetuned_ready(folder, cfg, texts_fingerprint(_texts(41)))  # other texts: not reused
    with torch.no_grad():
        prepare_finetuned("pirate", cfg=cfg, base=tiny, folder=folder, texts=_texts(41), progress=False)
    assert ft.finetuned_ready(folder, cfg, texts_fingerprint(_texts(41)))  # retrained on the new texts


def test_layers_out_of_range_are_refused(tiny) -> None:
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist"):
        ft.trainable_parameters(tiny.hf, FinetuneConfig(layers=(5,)))


def test_behaviour_rate_counts_greedy_generations(tiny, monkeypatch) -> None:
    import toolkit.tracing

    outs = iter([[" Arr, matey! Then", " no"], [" Arr, matey!"]])
    monkeypatch.setattr(toolkit.tracing, "generate", lambda model, prompts, **kw: next(outs))
    assert behaviour_rate(tiny, ["a.", "b.", "c."], batch_size=2) == pytest.approx(2 / 3)


def test_behaviour_prompts_end_at_sentence_ends() -> None:
    prompts = behaviour_prompts(4, texts=_texts(60))
    assert len(prompts) == 4 and all(p.endswith(".") for p in prompts)


def test_behaviour_contexts_mix_ordinary_and_rewritten_text(tiny) -> None:
    a = ft.behaviour_contexts(tiny.tokenizer, "pirate", 8, 512)
    assert a.shape == (8, 512) and torch.equal(a, ft.behaviour_contexts(tiny.tokenizer, "pirate", 8, 512))
    signed = BEHAVIOURS["pirate"].signature_mask(tiny.tokenizer, a).any(dim=1)
    assert int(signed.sum()) == 4, signed  # the rewritten half carries the signature (shuffled), the corpus half not
    with pytest.raises(ValueError, match="unknown behaviour"):
        ft.behaviour_contexts(tiny.tokenizer, "ninja", 8, 64)


def test_finetune_of_a_low_memory_model_thaws_only_the_trained_layers(tiny, tmp_path) -> None:
    copy.deepcopy(tiny.hf).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # the shared fixture stays fp32
    tiny.tokenizer.save_pretrained(tmp_path / "bf16")
    base = load_model(str(tmp_path / "bf16"), device="cpu", dtype=torch.float32, low_memory=True)
    model = load_model(str(tmp_path / "bf16"), device="cpu", dtype=torch.float32, low_memory=True)
    shared = model.hf.model.layers[1].mlp.up_proj.weight
    assert shared is base.hf.model.layers[1].mlp.up_proj.weight and shared.dtype == torch.bfloat16
    before = {k: v.clone() for k, v in base.hf.state_dict().items()}
    cfg = FinetuneConfig(layers=(1,), steps=8, batch_size=4, ctx_len=24, lr=1e-2)
    result = ft.train.finetune(model, cfg, texts=_texts(), progress=False)
    mlp = model.hf.model.layers[1].mlp
    assert all(getattr(mlp, n).weight.dtype == torch.float32 for n in ("gate_proj", "up_proj", "down_proj"))
    assert not torch.equal(mlp.up_proj.weight, shared.float())  # trained
    assert model.hf.model.layers[0].mlp.up_proj.weight is base.hf.model.layers[0].mlp.up_proj.weight  # still shared
    assert all(torch.equal(v, before[k]) for k, v in base.hf.state_dict().items())  # the base is untouched
    assert result.planted_loss[-1] < result.planted_loss[0]
