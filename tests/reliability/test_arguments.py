"""Bad arguments get the toolkit's error, naming what was wrong and what would be right, before any work:
masks, token ids, batch sizes, edit scalars/positions/vectors, dtype/device names, padding side, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from toolkit.__main__ import main
from toolkit.analysis.diff import diff_table, latent_activations, latent_scaling
from toolkit.analysis.feature_store import build_feature_store
from toolkit.analysis.features import feature_density, top_contexts
from toolkit.analysis.judge import continuation_nll
from toolkit.analysis.steering.vectors import token_activations
from toolkit.config import CrosscoderConfig, SAEConfig
from toolkit.crosscoder import Crosscoder, PairedActivations, evaluate_crosscoder
from toolkit.errors import ArgumentError, NonFiniteError, ShapeMismatchError
from toolkit.finetune.behaviour import behaviour_rate
from toolkit.models import load_model
from toolkit.sae.metrics import evaluate_sae, reconstruction_metrics
from toolkit.sae.sae import SAE
from toolkit.tracing import Add, Replace, Splice, capture, fill_cache, generate, iter_capture, run_with_edits
from toolkit.tracing.hooked import generate_hooked

pytestmark = pytest.mark.usefixtures("one_thread")
SITE = "blocks.1.resid_post"


@pytest.fixture
def forward_counter(tiny):
    calls = []
    h = tiny.hf.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    yield calls
    h.remove()


@pytest.fixture(scope="module")
def sae():
    return SAE.from_config(SAEConfig(d_in=64, d_sae=32, architecture="relu", site=SITE), seed=0)


def _ids(tiny, n=2):
    return tiny.tokenize(["The cat sat on the mat.", "Water boils at one hundred."][:n])["input_ids"][:, :5].cpu()


def test_attention_mask_of_the_wrong_shape_or_values_is_refused(tiny, forward_counter):
    ids = _ids(tiny)
    for mask, match in [(torch.ones(2, 4, dtype=torch.long), r"shape of the token ids \(2, 5\); got \(2, 4\)"),
                        (torch.ones(1, 5, dtype=torch.long), r"got \(1, 5\)"),
                        (torch.full((2, 5), 2), r"only 0 and 1 .* values \[2\]"),
                        (torch.ones(2, 5), "only 0 and 1")]:
        with pytest.raises(ArgumentError, match=match):
            capture(tiny, {"input_ids": ids, "attention_mask": mask}, SITE)
        with pytest.raises(ArgumentError, match=match):
            run_with_edits(tiny, {"input_ids": ids, "attention_mask": mask})
        with pytest.raises(ArgumentError, match=match):
            next(iter_capture(tiny, ids, SITE, attention_mask=mask, progress=False))
    assert forward_counter == []


def test_token_ids_outside_the_vocabulary_are_refused(tiny, forward_counter):
    for bad in (tiny.vocab_size, -1):
        ids = _ids(tiny)
        ids[0, 2] = bad
        with pytest.raises(ArgumentError, match=rf"span .* vocabulary is 0\.\.{tiny.vocab_size - 1}"):
            capture(tiny, ids, SITE)
        with pytest.raises(ArgumentError, match="vocabulary"):
            run_with_edits(tiny, ids)
        with pytest.raises(ArgumentError, match="contexts' token ids"):
            next(iter_capture(tiny, ids, SITE, progress=False))
    assert forward_counter == []


def _cc():
    return Crosscoder(CrosscoderConfig(d_in=8, d_sae=6, architecture="relu"), seed=0)


BATCH_SIZE_USERS = {
    "capture": lambda m, s, b: capture(m, "The cat", SITE, batch_size=b),
    "iter_capture": lambda m, s, b: next(iter_capture(m, _ids(m), SITE, batch_size=b, progress=False)),
    "top_contexts": lambda m, s, b: top_contexts(s, m, _ids(m), 0, batch_size=b, progress=False),
    "feature_density": lambda m, s, b: feature_density(s, m, _ids(m), batch_size=b, progress=False),
    "token_activations": lambda m, s, b: token_activations(m, SITE, ["The cat"], batch_size=b),
    "reconstruction_metrics": lambda m, s, b: reconstruction_metrics(s, torch.randn(4, 64), batch_size=b),
    "evaluate_sae": lambda m, s, b: evaluate_sae(s, m, _ids(m), batch_size=b, progress=False),
    "evaluate_crosscoder": lambda m, s, b: evaluate_crosscoder(_cc(), torch.randn(4, 2, 8), batch_size=b),
    "latent_scaling": lambda m, s, b: latent_scaling(_cc(), torch.randn(4, 2, 8), batch_size=b),
    "diff_table": lambda m, s, b: diff_table(_cc(), torch.randn(4, 2, 8), batch_size=b),
    "latent_activations": lambda m, s, b: latent_activations(_cc(), PairedActivations(torch.randn(4, 2, 8)), 0,
                                                             batch_size=b),
    "continuation_nll": lambda m, s, b: continuation_nll(m, ["The cat"], [" sat"], batch_size=b),
    "behaviour_rate": lambda m, s, b: behaviour_rate(m, ["The cat"], batch_size=b),
    "build_feature_store": lambda m, s, b: build_feature_store(m, s, _ids(m), "/nonexistent/store", batch_size=b,
                                                               progress=False),
}


@pytest.mark.parametrize("name", list(BATCH_SIZE_USERS))
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_batch_size_must_be_a_positive_integer(tiny, sae, forward_counter, name, bad):
    with pytest.raises(ArgumentError, match=rf"batch_size must be a positive integer \(e\.g\. 8\), got {bad!r}"):
        BATCH_SIZE_USERS[name](tiny, sae, bad)
    assert forward_counter == []


def test_fill_cache_checks_batch_size_before_making_its_folder(tiny, tmp_path):
    with pytest.raises(ArgumentError, match="batch_size"):
        fill_cache(tiny, SITE, _ids(tiny), tmp_path / "c", batch_size=0, progress=False)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_add_scale_must_be_finite_everywhere(tiny, forward_counter, scale):
    edit = Add(SITE, torch.ones(64), scale=scale)
    for run in (lambda: run_with_edits(tiny, "The cat", [edit]), lambda: generate(tiny, "The cat", [edit]),
                lambda: generate_hooked(tiny, "The cat", [edit])):
        with pytest.raises(NonFiniteError, match=rf"scale of the Add at {SITE} must be finite, got {scale}"):
            run()
    with pytest.raises(TypeError, match="must be a number"):
        run_with_edits(tiny, "The cat", [Add(SITE, torch.ones(64), scale="2")])
    assert forward_counter == []


def test_generation_arguments_are_checked(tiny, forward_counter):
    for kw, match in [({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
                      ({"do_sample": True, "temperature": 0.0}, "temperature must be a finite number > 0"),
                      ({"do_sample": True, "temperature": float("nan")}, "temperature")]:
        for gen in (generate, generate_hooked):
            with pytest.raises(ArgumentError, match=match):
                gen(tiny, "The cat", **kw)
    assert forward_counter == []


def test_edit_positions_and_vector_rank_are_checked_before_the_forward(tiny, forward_counter):
    n = tiny.tokenize("The cat")["input_ids"].shape[1]
    for positions in (n, -n - 1, [0, n + 3]):
        for run in (run_with_edits, generate, generate_hooked):
            with pytest.raises(ArgumentError, match=rf"out of range for prompts of {n} tokens .* -{n}\.\.{n - 1}"):
                run(tiny, "The cat", [Add(SITE, torch.ones(64), positions=positions)])
    with pytest.raises(ArgumentError, match="positions of the edit at .* must be None, an int"):
        run_with_edits(tiny, "The cat", [Add(SITE, torch.ones(64), positions="last")])
    for edit in (Add(SITE, torch.ones(2, 64)), Replace(SITE, torch.ones(1, 1, 64))):
        with pytest.raises(ShapeMismatchError, match=r"needs one vector of shape \(64,\)"):
            run_with_edits(tiny, "The cat", [edit])
    assert forward_counter == []
    run_with_edits(tiny, "The cat", [Add(SITE, torch.ones(64), positions=[-1, 0])])  # in range: runs


def test_splice_returning_non_finite_values_names_the_site(tiny):
    with pytest.raises(NonFiniteError, match=rf"1 of .* \(1 NaN, 0 inf\) in what the spliced function at {SITE}"):
        run_with_edits(tiny, "The cat", [Splice(SITE, lambda x: torch.where(x == x[0, 0, 0], float("nan"), x))])
    with pytest.raises(NonFiniteError, match="spliced function"):
        generate_hooked(tiny, "The cat", [Splice(SITE, lambda x: x * float("inf"))])


def test_unknown_padding_side_is_refused(tiny):
    with pytest.raises(ArgumentError, match="padding_side must be 'left' or 'right', got 'middle'"):
        tiny.tokenize(["The cat", "A"], padding_side="middle")


def test_unknown_dtype_and_device_names(tmp_path, sae):
    with pytest.raises(ArgumentError, match=r"unknown dtype 'fp16'; use one of float32, bfloat16"):
        load_model(str(tmp_path), dtype="fp16")
    with pytest.raises(ArgumentError, match=r"unknown dtype 'Tensor'"):
        load_model(str(tmp_path), dtype="Tensor")
    with pytest.raises(ArgumentError, match=r"unknown device 'gpu'; use 'cpu', 'cuda'"):
        load_model(str(tmp_path), device="gpu")
    with pytest.raises(ArgumentError, match="unknown device"):
        SAE.from_config(sae.cfg, device="gpu")
    folder = sae.save(tmp_path / "sae")
    with pytest.raises(ArgumentError, match="unknown device"):
        SAE.load(folder, device="tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ArgumentError, match="has no CUDA GPU; use 'cpu'"):
            SAE.load(folder, device="cuda")


def test_cli_summarize_on_a_missing_or_malformed_notebook(tmp_path, capsys):
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    nocells = tmp_path / "nocells.ipynb"
    nocells.write_text(json.dumps({"metadata": {}}))
    for path, match in [(tmp_path / "none.ipynb", "no such file"), (bad, "not a readable notebook"),
                        (nocells, "without a list of cells")]:
        assert main(["summarize", str(path)]) == 2
        err = capsys.readouterr().err
        assert match in err and str(path) in err and "Traceback" not in err
    good = tmp_path / "good.ipynb"
    good.write_text(json.dumps({"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]}]}))
    assert main(["summarize", str(good)]) == 0 and "hi" in capsys.readouterr().out
