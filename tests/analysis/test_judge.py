"""The offline judge: each score against its rule, calibration, the harmonic mean, and bad input."""

import math

import pytest
import torch

from toolkit.analysis.judge import (
    Judge,
    LexiconConcept,
    TfidfConcept,
    content_words,
    continuation_nll,
    harmonic,
    instruction_score,
    repetition,
    stem,
)
from toolkit.errors import EmptyInputError


def test_lexicon_concept_counts_stem_hits():
    c = LexiconConcept(("ocean", "wave", "sea"))
    assert c.hits("Oceans and waves; the seas.") == 3
    assert c(["nothing here", "one wave", "waves at sea"]) == [0.0, 1.0, 2.0]
    assert LexiconConcept(("ocean",), full=3)(["ocean ocean"]) == [1.0]
    assert stem("boiling") == "boil" and stem("cats") == "cat" and stem("is") == "is"
    with pytest.raises(EmptyInputError):
        LexiconConcept(())
    with pytest.raises(TypeError):
        c("just a string")


def test_tfidf_concept_learns_from_separate_texts():
    pos = ["the ocean waves crash", "deep blue sea water", "fish swim in the sea", "tides of the ocean"] * 2
    neg = ["the court ruled on tax law", "a judge read the verdict", "tax forms are due", "the law changed"] * 2
    c = TfidfConcept(pos, neg)
    assert c(["waves of the deep ocean", "the judge and the law"]) == [2.0, 0.0]
    p = c.probability(["sea", "tax"])
    assert p[0] > 0.5 > p[1]
    with pytest.raises(EmptyInputError):
        TfidfConcept(pos, [])
    with pytest.raises(ValueError, match="low <= high"):
        TfidfConcept(pos, neg, low=0.9, high=0.5)


def test_tfidf_concept_is_not_swamped_by_more_negatives_than_positives():
    # AxBench-style judge sets hold many more negatives than positives; unweighted, every text scored 0
    pos = ["the ocean waves crash on the beach", "whales swim in the deep sea", "coral reefs under the sea"]
    neg = [f"an ordinary sentence number {i} about the town council and its budget" for i in range(30)]
    c = TfidfConcept(pos, neg)
    assert c.probability(["waves on the sea and the beach"])[0] > 0.5
    assert c(["the council budget"]) == [0.0]


def test_instruction_repetition_harmonic():
    assert content_words("Write a story about the ocean") == {"ocean"}
    assert instruction_score("The history of Rome", "Rome grew into an empire") == 2.0
    assert instruction_score("The history of Rome and Greece and Egypt and Persia", "Rome") == 1.0
    assert instruction_score("The history of Rome", "cats are nice") == 0.0
    assert instruction_score("The a of", "anything") == 2.0
    assert repetition("a b c d e f") == 0.0
    assert repetition("the cat the cat the cat the cat") > 0.5
    assert harmonic([2, 2, 2]) == 2.0 and harmonic([2, 1, 2]) == pytest.approx(1.5) and harmonic([2, 0, 2]) == 0.0


def test_fluency_is_relative_to_unsteered_and_calibrated(tiny):
    prompts = ["The cat sat", "Paris is"]
    unsteered = [" on the mat.", " the capital of France."]
    nll = continuation_nll(tiny, prompts, unsteered + [""][:0])
    assert len(nll) == 2 and all(math.isfinite(x) and x > 0 for x in nll)
    assert continuation_nll(tiny, ["Paris"], [""]) == [math.inf]
    judge = Judge(tiny, LexiconConcept(("cat",)))
    with pytest.raises(RuntimeError, match="calibrate"):
        judge.score(prompts, unsteered)
    ref = judge.calibrate(prompts, unsteered)
    assert ref == pytest.approx(sorted(nll)[0] + (sorted(nll)[1] - sorted(nll)[0]) / 2)
    s = judge.score(prompts + ["The cat sat"], [" cat on the mat", " the capital of France.", "mat mat mat mat mat mat"])
    assert s[0].concept == 1.0 and s[0].instruction == 2.0
    assert s[1].concept == 0.0 and s[1].overall == 0.0
    assert s[2].repetition > 0.5 and s[2].fluency == 0.0
    assert judge.fluency(ref + 0.1, 0.0) == 2.0 and judge.fluency(ref + 1.5, 0.0) == 1.0
    assert judge.fluency(ref + 5.0, 0.0) == 0.0 and judge.fluency(math.inf, 0.0) == 0.0
    fns = judge.scorers()
    assert set(fns) == {"concept", "instruction", "fluency", "overall"}
    assert fns["concept"](prompts, [" a cat", " Paris"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 prompts but 1"):
        judge.score(prompts, ["x"])
    with pytest.raises(TypeError, match="callable"):
        Judge(tiny, "ocean")


def test_continuation_nll_is_the_mean_token_loss_at_any_batch_size(tiny):
    prompts = ["The cat sat", "Paris is", "A"]
    conts = [" on the mat.", " the capital of France and more", ""]
    got = continuation_nll(tiny, prompts, conts, batch_size=3)
    assert continuation_nll(tiny, prompts, conts, batch_size=1) == pytest.approx(got, rel=1e-5)
    tok = tiny.tokenizer
    p, c = [tiny.bos_token_id, *tok(prompts[1], add_special_tokens=False)["input_ids"]], \
        tok(conts[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # the padded batch above scores the second row like this unpadded forward
        logits = tiny.hf(input_ids=torch.tensor([p + c])).logits[0].float()
    ref = -logits[len(p) - 1:-1].log_softmax(-1).gather(-1, torch.tensor(c)[:, None]).mean()
    assert got[1] == pytest.approx(float(ref), rel=1e-5) and got[2] == math.inf
