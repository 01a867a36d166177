"""Zero-shot, retrieval and VQA metrics against hand-computed values and torchmetrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rcc_compression.evaluation.retrieval import recall_at_k, retrieval_metrics, retrieval_ranks
from rcc_compression.evaluation.vqa import normalize_answer, vqa_accuracy, vqa_metrics
from rcc_compression.evaluation.zero_shot import (
    classifier_weights,
    get_templates,
    per_class_recall,
    template_sets,
    topk_correct,
    zero_shot_metrics,
)


# ------------------------------------------------------------------------------- zero-shot
def test_topk_and_per_class_recall_by_hand() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.2, 0.3, 0.4]])
    labels = torch.tensor([0, 1, 1, 0])
    hits = topk_correct(logits, labels, ks=(1, 2))
    assert hits[1].tolist() == [True, False, True, False]
    assert hits[2].tolist() == [True, True, True, False]  # item 1: class 1 is second; item 3: class 0 is third
    assert per_class_recall(hits[1], labels.numpy(), 3).tolist()[:2] == [0.5, 0.5]
    m = zero_shot_metrics(logits, labels, samples=0, ks=(1, 2))
    assert m["top1"]["value"] == 0.5 and m["top2"]["value"] == 0.75
    assert m["mean_per_class_recall"]["value"] == 0.5  # classes 0 and 1 present, class 2 absent


def test_zero_shot_metrics_equal_torchmetrics() -> None:
    from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=gen)
    labels = torch.randint(0, 10, (500,), generator=gen)
    logits[torch.arange(250), labels[:250]] += 2.0  # some signal
    m = zero_shot_metrics(logits, labels, samples=200, seed=0)
    acc1 = MulticlassAccuracy(num_classes=10, top_k=1, average="micro")(logits, labels).item()
    acc5 = MulticlassAccuracy(num_classes=10, top_k=5, average="micro")(logits, labels).item()
    mpcr = MulticlassRecall(num_classes=10, average="macro")(logits, labels).item()
    assert m["top1"]["value"] == pytest.approx(acc1, abs=1e-6)
    assert m["top5"]["value"] == pytest.approx(acc5, abs=1e-6)
    assert m["mean_per_class_recall"]["value"] == pytest.approx(mpcr, abs=1e-6)
    for k in ("top1", "top5", "mean_per_class_recall"):
        assert m[k]["ci_low"] < m[k]["value"] < m[k]["ci_high"] and m[k]["ci_high"] - m[k]["ci_low"] < 0.15


def test_templates_shipped() -> None:
    imagenet = get_templates("openai_imagenet")
    assert len(imagenet) == 80 == len(set(imagenet)) and all("{}" in t for t in imagenet)
    assert imagenet[0] == "a bad photo of a {}." and imagenet[-1] == "a tattoo of the {}."
    from rcc_compression.data.world import WORLD_COLOUR_TEMPLATES, WORLD_TEMPLATES

    assert get_templates("world") == list(WORLD_TEMPLATES) and get_templates("world_colour") == list(
        WORLD_COLOUR_TEMPLATES
    )
    assert get_templates(None, "imagenet") == imagenet and {"simple", "world"} <= set(template_sets())
    from rcc_compression.errors import DataError

    with pytest.raises(DataError, match="unknown template set"):
        get_templates("nope")
    with pytest.raises(DataError, match="'{}'"):
        get_templates(["no placeholder"])


def test_classifier_weights_are_renormalised_template_means(tiny_clip) -> None:
    names, templates = ["red circle", "blue star"], ["a photo of a {}.", "a {}."]
    w = classifier_weights(tiny_clip, names, templates)
    for c, name in enumerate(names):
        embs = F.normalize(torch.stack([tiny_clip.encode_text([t.format(name)])[0] for t in templates]), dim=-1)
        assert torch.allclose(w[c], F.normalize(embs.mean(0), dim=0), atol=1e-5)
    assert torch.allclose(w.norm(dim=1), torch.ones(2), atol=1e-6)


# -------------------------------------------------------------------------------- retrieval
def test_retrieval_ranks_by_hand() -> None:
    # 2 images, 4 captions: captions 0, 1 of image 0; captions 2, 3 of image 1
    sim = torch.tensor([[0.1, 0.9, 0.95, 0.2], [0.3, 0.0, 0.5, 0.4]])
    owner = torch.tensor([0, 0, 1, 1])
    i2t, t2i = retrieval_ranks(sim, owner)
    assert i2t.tolist() == [1, 0]  # image 0: best own caption 0.9, one text (0.95) above; image 1: 0.5 is top
    assert t2i.tolist() == [1, 0, 1, 0]  # caption 0: image 1 (0.3) beats 0.1; caption 2: image 0 (0.95) beats 0.5
    hits = recall_at_k(i2t, (1, 2))
    assert hits[1].tolist() == [False, True] and hits[2].tolist() == [True, True]
    m = retrieval_metrics(sim, owner, ks=(1,), samples=0)
    assert m["i2t_R@1"]["value"] == 0.5 and m["t2i_R@1"]["value"] == 0.5
    assert m["i2t_median_rank"]["value"] == 1.0 and m["t2i_median_rank"]["value"] == 1.0  # lower medians, 1-based


def test_retrieval_equals_torchmetrics_hit_rate() -> None:
    from torchmetrics.retrieval import RetrievalHitRate

    gen = torch.Generator().manual_seed(1)
    n_img, per = 40, 5
    owner = torch.arange(n_img).repeat_interleave(per)
    sim = torch.randn(n_img, n_img * per, generator=gen)
    sim[owner, torch.arange(n_img * per)] += 1.5
    m = retrieval_metrics(sim, owner, samples=100)
    for k in (1, 5, 10):
        target = owner[None, :] == torch.arange(n_img)[:, None]
        i2t = RetrievalHitRate(top_k=k)(
            sim.flatten(), target.flatten(), indexes=torch.arange(n_img).repeat_interleave(n_img * per)
        )
        t2i = RetrievalHitRate(top_k=k)(
            sim.t().flatten(), target.t().flatten(), indexes=torch.arange(n_img * per).repeat_interleave(n_img)
        )
        assert m[f"i2t_R@{k}"]["value"] == pytest.approx(i2t.item(), abs=1e-6)
        assert m[f"t2i_R@{k}"]["value"] == pytest.approx(t2i.item(), abs=1e-6)
        assert m[f"i2t_R@{k}"]["ci_low"] <= m[f"i2t_R@{k}"]["value"] <= m[f"i2t_R@{k}"]["ci_high"]


# -------------------------------------------------------------------------------------- VQA
def test_vqa_soft_accuracy_by_hand() -> None:
    ten = ["red"] * 3 + ["pink"] * 7
    # leave-one-out: 3 subsets lose a "red" (2 matches -> 2/3), 7 keep all three (-> 1)
    assert vqa_accuracy("red", ten) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("pink", ten) == 1.0
    assert vqa_accuracy("blue", ten) == 0.0
    assert vqa_accuracy("Red.", ten) == pytest.approx(0.9)  # normalised because the answers disagree
    one_match = ["a"] + ["b"] * 9
    assert vqa_accuracy("a", one_match) == pytest.approx(9 * (1 / 3) / 10)
    # official quirk: unanimous answers are compared without normalisation
    assert vqa_accuracy("two", ["2"] * 10) == 0.0 and vqa_accuracy("two", ["2"] * 10, official=False) == 1.0
    assert vqa_accuracy("yes", ["yes"]) == 1.0


def test_vqa_answer_normalisation() -> None:
    assert normalize_answer("Two") == "2"
    assert normalize_answer("the dog.") == "dog"
    assert normalize_answer("isnt it") == "isn't it"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("red/blue") == "red blue"
    assert normalize_answer("  a\tgreen \n circle ") == "green circle"


def test_vqa_metrics_by_answer_type() -> None:
    m = vqa_metrics(
        ["red", "2", "no"], [["red"] * 10, ["2"] * 10, ["yes"] * 10], ["other", "number", "yes/no"], samples=100
    )
    assert m["accuracy"]["value"] == pytest.approx(2 / 3)
    assert m["accuracy_other"]["value"] == 1.0 and m["accuracy_yes_no"]["value"] == 0.0
    assert np.isclose(m["accuracy_number"]["value"], 1.0)
