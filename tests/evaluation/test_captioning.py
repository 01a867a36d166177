"""Captioning metrics equal pycocoevalcap on the same inputs, BLEU agrees with torchmetrics and by hand."""

from __future__ import annotations

import pytest

from rcc_compression.evaluation.captioning import SPICE_NOTE, caption_metrics, java_available, simple_tokenize, tokenize

GTS = {
    "1": ["A red circle on the left.", "a circle that is red", "there is one red disc."],
    "2": ["Two blue stars.", "a pair of blue stars", "two stars that are blue"],
    "3": ["a green heart above a white ring", "a white ring below a green heart", "a heart and a ring"],
    "4": ["a small yellow square", "one yellow box", "a yellow square on a striped background"],
}
RES = {"1": ["a red circle."], "2": ["two blue stars"], "3": ["a green heart and a white ring"], "4": ["a blue square"]}


def test_point_estimates_equal_pycocoevalcap() -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out = caption_metrics(GTS, RES, samples=200, meteor=False)
    gts_tok, _ = tokenize(GTS)
    res_tok, _ = tokenize(RES)
    bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
    rouge, _ = Rouge().compute_score(gts_tok, res_tok)
    cider, _ = Cider().compute_score(gts_tok, res_tok)
    m = out["metrics"]
    for n in range(4):
        assert m[f"BLEU-{n + 1}"]["value"] == pytest.approx(bleu[n], abs=1e-12)
    assert m["ROUGE-L"]["value"] == pytest.approx(rouge, abs=1e-12)
    assert m["CIDEr"]["value"] == pytest.approx(cider, abs=1e-12)
    for name, est in m.items():
        assert est["ci_low"] <= est["value"] <= est["ci_high"], name
        assert est["n"] == 4
    assert SPICE_NOTE in out["notes"] and out["tokenizer"] == ("ptb" if java_available() else "simple")


def test_bleu_agrees_with_torchmetrics_and_by_hand() -> None:
    from torchmetrics.text import BLEUScore

    gts_tok, _ = tokenize(GTS, use_java=False)
    res_tok, _ = tokenize(RES, use_java=False)
    out = caption_metrics(GTS, RES, samples=0, meteor=False, use_java=False)
    keys = sorted(GTS)
    for n in (1, 2):
        tm = BLEUScore(n_gram=n)([res_tok[k][0] for k in keys], [gts_tok[k] for k in keys]).item()
        assert out["metrics"][f"BLEU-{n}"]["value"] == pytest.approx(tm, abs=1e-6)
    # by hand, one pair: hypothesis "a blue square" against "a small yellow square" / "one yellow box" / ...
    one = caption_metrics({"4": GTS["4"]}, {"4": RES["4"]}, samples=0, meteor=False, use_java=False)["metrics"]
    # unigrams: a, blue, square -> a and square match: 2/3;
    # closest reference length 3 ("one yellow box"): no brevity penalty
    assert one["BLEU-1"]["value"] == pytest.approx(2 / 3, abs=1e-9)
    # bigrams: "a blue", "blue square" -> none match: BLEU-2 is (tiny) zero
    assert one["BLEU-2"]["value"] < 1e-6


@pytest.mark.slow
@pytest.mark.skipif(not java_available(), reason="METEOR needs Java")
def test_meteor_with_java() -> None:
    from pycocoevalcap.meteor.meteor import Meteor

    out = caption_metrics(GTS, RES, samples=100)
    gts_tok, _ = tokenize(GTS)
    res_tok, _ = tokenize(RES)
    scorer = Meteor()
    score, _ = scorer.compute_score(gts_tok, res_tok)
    del scorer
    assert out["metrics"]["METEOR"]["value"] == pytest.approx(score, abs=1e-9)
    assert 0.0 < score < 1.0


def test_without_java_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import rcc_compression.evaluation.captioning as cap

    monkeypatch.setattr(cap, "java_available", lambda: False)
    out = cap.caption_metrics(GTS, RES, samples=0)
    assert "METEOR" not in out["metrics"] and out["tokenizer"] == "simple"
    assert "METEOR not computed: Java was not found on the PATH" in out["notes"]
    assert any("tokenised in Python" in n for n in out["notes"])


def test_simple_tokenizer_drops_ptb_punctuation() -> None:
    assert simple_tokenize({"a": ["A red circle, on the LEFT."]}) == {"a": ["a red circle on the left"]}


def test_input_checks() -> None:
    from rcc_compression.errors import DataError

    with pytest.raises(DataError, match="different images"):
        caption_metrics({"1": ["a"]}, {"2": ["a"]}, samples=0)
    with pytest.raises(DataError, match="exactly one"):
        caption_metrics({"1": ["a"]}, {"1": ["a", "b"]}, samples=0)
