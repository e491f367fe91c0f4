"""`prepare_tutorials` checks its arguments before any work; `disk_usage` counts files, not links."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from toolkit.prepare import (
    STEPS,
    TUTORIAL_CROSSCODER,
    TUTORIAL_CROSSCODER_SITE,
    TUTORIAL_SAE,
    TUTORIAL_STORE_CONTEXTS,
    disk_usage,
    prepare_tutorials,
)


def test_bad_size_and_unknown_step_fail_before_work(monkeypatch):
    ran = []
    monkeypatch.setitem(STEPS, "sae", lambda size, progress: ran.append(size) or "sae")
    with pytest.raises(ValueError, match="size must be one of ci, full"):
        prepare_tutorials("huge")
    with pytest.raises(ValueError, match=r"unknown prepare step\(s\) \['crosscoders'\]"):
        prepare_tutorials("ci", only=["sae", "crosscoders"])
    assert ran == []


def test_steps_run_in_order_and_report(monkeypatch):
    ran, lines = [], []
    monkeypatch.setattr("toolkit.prepare.STEPS", {"a": lambda s, p: ran.append(("a", s)) or "made a",
                                                  "b": lambda s, p: ran.append(("b", s)) or "made b"})
    done = prepare_tutorials("full", progress=False, log=lines.append)
    assert ran == [("a", "full"), ("b", "full")] and [w for w, _ in done] == ["made a", "made b"]
    assert lines[0].startswith("made a: ready in ")


def test_sizes_match_the_tutorial_switch():
    assert set(TUTORIAL_SAE) == {"ci", "full"}
    assert TUTORIAL_SAE["ci"]["site"] == TUTORIAL_SAE["full"]["site"]


def test_crosscoder_settings_are_tutorial_03s():
    # prepare finds the crosscoder only under tutorial 03's own cache key: its settings must be the notebook's
    nb = json.loads((Path(__file__).resolve().parents[1] / "notebooks" / "03_model_diff.ipynb").read_text())
    src = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    ci, full = TUTORIAL_CROSSCODER["ci"], TUTORIAL_CROSSCODER["full"]
    assert (f"N_CONTEXTS, CTX_LEN = ({full['n_contexts']}, {full['ctx_len']}) if FULL else "
            f"({ci['n_contexts']}, {ci['ctx_len']})") in src
    assert (f"D_SAE, K, STEPS = ({full['d_sae']}, {full['k']}, {full['steps']}) if FULL else "
            f"({ci['d_sae']}, {ci['k']}, {ci['steps']})") in src
    assert f'SITE = "{TUTORIAL_CROSSCODER_SITE}"' in src
    assert 'behaviour_contexts(base.tokenizer, "pirate", N_CONTEXTS, CTX_LEN)' in src
    assert "total_steps=STEPS, batch_size=512, lr=2e-3, seed=0" in src
    assert list(STEPS) == ["sae", "features", "finetune", "crosscoder"]


def _notebook_code(name: str) -> str:
    nb = json.loads((Path(__file__).resolve().parents[1] / "notebooks" / name).read_text())
    return "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def test_sae_and_feature_store_settings_are_tutorial_01s():
    src = _notebook_code("01_sae_features.ipynb")
    ci, full = TUTORIAL_SAE["ci"], TUTORIAL_SAE["full"]
    assert f'SITE = "{ci["site"]}"' in src
    assert f"CorpusSpec(n_contexts={full['n_contexts']} if FULL else {ci['n_contexts']})" in src
    assert (f'trained_sae(model, SITE, "{ci["architecture"]}", d_sae={ci["d_sae"]}, k={ci["k"]}, '
            f"steps={full['steps']} if FULL else {ci['steps']}, corpus=corpus)") in src
    n = TUTORIAL_STORE_CONTEXTS
    assert (f'token_contexts(model.tokenizer, load_texts("default"), 128)[-({n["full"]} if FULL else {n["ci"]}):]'
            in src)
    assert "build_feature_store(model, sae, held_out)" in src


def test_disk_usage_skips_links(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 50)
    os.symlink(tmp_path / "a", tmp_path / "link")
    assert disk_usage(tmp_path) == 150
