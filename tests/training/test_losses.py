"""Loss values against hand computation and the models' own losses; KD gradients by gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from rcc_compression.compression.calibration import flatten_outputs
from rcc_compression.models import get_model
from rcc_compression.training.losses import (
    DistillationLoss,
    FeatureMatchingLoss,
    LossWeights,
    attention_kl,
    attention_transfer,
    clip_contrastive_kd,
    clip_contrastive_loss,
    feature_loss,
    kd_logits,
    lm_loss,
    model_family,
    pair_layers,
)
from rcc_compression.training.teacher import model_extras


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _softmax(x: list[float]) -> list[float]:
    e = [math.exp(v) for v in x]
    return [v / sum(e) for v in e]


def test_kd_logits_by_hand() -> None:
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    assert kd_logits(s, t, 1.0).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-7)
    # T = 2: softmax of halved logits, times T^2 = 4
    p_t = _softmax([math.log(3.0) / 2, 0.0])
    assert kd_logits(s, t, 2.0).item() == pytest.approx(4 * _kl(p_t, [0.5, 0.5]), abs=1e-6)
    # masked rows do not count; the mean is over the rows kept
    s2, t2 = torch.tensor([[0.0, 0.0], [5.0, -5.0]]), torch.tensor([[math.log(3.0), 0.0], [-5.0, 5.0]])
    assert kd_logits(s2, t2, 1.0, mask=torch.tensor([True, False])).item() == pytest.approx(
        kd_logits(s, t, 1.0).item(), abs=1e-7)
    assert kd_logits(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_clip_contrastive_kd_matches_both_directions() -> None:
    s = [[1.0, 0.0], [0.5, 2.0]]
    t = [[2.0, -1.0], [0.0, 1.0]]
    rows = (_kl(_softmax(t[0]), _softmax(s[0])) + _kl(_softmax(t[1]), _softmax(s[1]))) / 2
    cols_s, cols_t = [[s[0][j], s[1][j]] for j in range(2)], [[t[0][j], t[1][j]] for j in range(2)]
    cols = sum(_kl(_softmax(ct), _softmax(cs)) for cs, ct in zip(cols_s, cols_t, strict=True)) / 2
    got = clip_contrastive_kd(torch.tensor(s), torch.tensor(t), 1.0).item()
    assert got == pytest.approx(0.5 * (rows + cols), abs=1e-6)
    assert got != pytest.approx(rows, abs=1e-3)  # the text->image direction really counts


def test_clip_contrastive_loss_by_hand_and_as_clip_computes_it(tiny_clip, make_batches) -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    r0, r1 = -math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(math.e / (1 + math.e))
    assert clip_contrastive_loss(logits).item() == pytest.approx(0.5 * (r0 + r1), abs=1e-6)
    batch = make_batches(tiny_clip, 1, 6, 0)[0]
    out = tiny_clip.model(**batch, return_loss=True)
    assert clip_contrastive_loss(out.logits_per_image).item() == pytest.approx(out.loss.item(), abs=1e-6)


def test_lm_loss_by_hand_and_as_blip_computes_it(tiny_blip, make_batches) -> None:
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # position 0 predicts label[1] = 2 with p = 3/6
    labels = torch.tensor([[0, 2, -100]])
    assert lm_loss(logits, labels).item() == pytest.approx(-math.log(3.0 / 6.0), abs=1e-6)
    batch = make_batches(tiny_blip, 1, 3, 0)[0]
    tiny_blip.model.text_decoder.label_smoothing = 0.1
    out = tiny_blip.model(**batch, labels=batch["input_ids"])
    assert lm_loss(out.logits, batch["input_ids"], label_smoothing=0.1).item() == pytest.approx(out.loss.item(),
                                                                                                  abs=1e-5)


def test_feature_loss_is_per_sample_relative() -> None:
    s = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 2.0], [3.0, 4.0]])
    assert feature_loss(s, t).item() == pytest.approx((5.0 / 4.0 + 0.0) / 2, abs=1e-7)
    # token features: every dim after the first belongs to the sample
    assert feature_loss(s.reshape(2, 1, 2), t.reshape(2, 1, 2)).item() == pytest.approx(0.625, abs=1e-7)


def test_attention_kl_by_hand() -> None:
    t = torch.tensor([0.5, 0.5]).reshape(1, 1, 1, 2)
    s = torch.tensor([0.25, 0.75]).reshape(1, 1, 1, 2)
    assert attention_kl(s, t).item() == pytest.approx(_kl([0.5, 0.5], [0.25, 0.75]), abs=1e-7)
    one_hot = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    assert attention_kl(torch.full((1, 1, 1, 2), 0.5), one_hot).item() == pytest.approx(math.log(2), abs=1e-7)
    # 2 student heads vs 1 teacher head: heads are averaged first
    s2 = torch.tensor([[0.25, 0.75], [0.75, 0.25]]).reshape(1, 2, 1, 2)
    assert attention_kl(s2, t).item() == pytest.approx(0.0, abs=1e-7)


def test_pair_layers() -> None:
    assert pair_layers(2, 4) == [(0, 1), (1, 3)]
    assert pair_layers(3, 12) == [(0, 3), (1, 7), (2, 11)]
    assert pair_layers(4, 4) == [(i, i) for i in range(4)]


def test_attention_transfer_on_clip(tiny_clip, make_batches) -> None:
    model = tiny_clip.model
    model.set_attn_implementation("eager")
    batch = make_batches(tiny_clip, 1, 4, 0)[0]
    out = flatten_outputs(model(**batch, output_attentions=True))
    assert attention_transfer(out, out).item() == pytest.approx(0.0, abs=1e-6)
    other = {k: v.flip(-1) if "attentions" in k else v for k, v in out.items()}
    keys = [k for k in out if "attentions" in k]
    expected = sum(attention_kl(other[k], out[k]).item() for k in keys) / len(keys)
    assert len(keys) == 4  # 2 layers x (vision, text)
    assert attention_transfer(other, out).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_gradients_pass_gradcheck(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(lambda x: kd_logits(x, t, temperature), (s,))
    assert torch.autograd.gradcheck(lambda x: kd_logits(x, t, temperature, mask), (s,))
    sq = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    tq = torch.randn(4, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: clip_contrastive_kd(x, tq, temperature), (sq,))
    # closed form: d/ds of T^2 KL = T (softmax(s/T) - softmax(t/T)) / rows
    kd_logits(s, t, temperature).backward()
    want = temperature * (torch.softmax(s / temperature, -1) - torch.softmax(t / temperature, -1)) / 3
    torch.testing.assert_close(s.grad, want.detach(), rtol=1e-10, atol=1e-12)


def test_distillation_loss_weights_and_projection() -> None:
    g = torch.Generator().manual_seed(1)
    teacher = {"logits_per_image": torch.randn(4, 4, generator=g), "image_embeds": torch.randn(4, 6, generator=g)}
    student = {"logits_per_image": torch.randn(4, 4, generator=g), "image_embeds": torch.randn(4, 3, generator=g)}
    loss = DistillationLoss("clip", LossWeights(kd=0.5, feature=2.0, task=0.25), temperature=2.0,
                            feature_keys=["image_embeds"], projections={"image_embeds": (3, 6)})
    total, terms = loss(student, teacher)
    proj = loss.features.proj["image_embeds"]
    assert set(terms) == {"kd", "feature", "task"}
    assert terms["kd"] == pytest.approx(clip_contrastive_kd(student["logits_per_image"],
                                                            teacher["logits_per_image"], 2.0).item(), rel=1e-6)
    assert terms["feature"] == pytest.approx(feature_loss(proj(student["image_embeds"]),
                                                          teacher["image_embeds"]).item(), rel=1e-6)
    assert terms["task"] == pytest.approx(clip_contrastive_loss(student["logits_per_image"]).item(), rel=1e-6)
    assert total.item() == pytest.approx(0.5 * terms["kd"] + 2.0 * terms["feature"] + 0.25 * terms["task"], rel=1e-6)
    total.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    # a projection that maps the student onto the teacher exactly makes the feature term vanish
    with torch.no_grad():
        exact_t = {"image_embeds": proj(student["image_embeds"])}
    assert loss.features(student, exact_t).item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="projection"):
        DistillationLoss("clip", feature_keys=["image_embeds"]).features(student, teacher)
    with pytest.raises(ValueError, match="zero"):
        DistillationLoss("clip", LossWeights(0, 0, 0, 0))(student, teacher)


def test_clip_logits_from_embeddings_equal_the_models(tiny_clip, make_batches) -> None:
    model = tiny_clip.model
    batch = make_batches(tiny_clip, 1, 5, 3)[0]
    out = flatten_outputs(model(**batch))
    out.update(model_extras(model))
    gathered = DistillationLoss("clip", gather=lambda x: x)
    plain = DistillationLoss("clip")
    torch.testing.assert_close(gathered._clip_logits(out), out["logits_per_image"], rtol=1e-5, atol=1e-5)
    other = get_model("tiny-clip", seed=5).model
    teacher = flatten_outputs(other(**batch))
    teacher.update(model_extras(other))
    a, terms_a = gathered(out, teacher)
    b, terms_b = plain(out, teacher)
    assert terms_a["kd"] > 1e-3
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_blip_kd_ignores_padding(tiny_blip, make_batches) -> None:
    assert model_family(tiny_blip) == "blip" and model_family(tiny_blip.model) == "blip"
    batch = make_batches(tiny_blip, 1, 2, 0)[0]
    batch["attention_mask"][:, -3:] = 0
    out = flatten_outputs(tiny_blip.model(**batch))
    noisy = {k: v.clone() for k, v in out.items()}
    noisy["logits"][:, -3:] += 5 * torch.randn_like(noisy["logits"][:, -3:])  # predictions of padded positions
    loss = DistillationLoss("blip", LossWeights(kd=1.0, feature=0.0))
    # position i predicts token i+1: positions L-4..L-1 predict padding (or nothing) and do not count
    assert loss(noisy, out, batch)[1]["kd"] == pytest.approx(0.0, abs=1e-6)
    noisy["logits"][:, 0] += 1.0 + torch.arange(noisy["logits"].shape[-1]) * 0.01
    assert loss(noisy, out, batch)[1]["kd"] > 1e-5


def test_feature_matching_over_every_shared_output() -> None:
    t = {"a": torch.tensor([[0.0, 2.0]]), "b": torch.tensor([[1.0, 1.0, 1.0]]), "only_teacher": torch.ones(1, 2),
         "text_model_output.attentions.0": torch.full((1, 1, 1, 2), 0.5)}
    s = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[1.0, 1.0, 4.0]]), "odd": torch.ones(1, 2),
         "text_model_output.attentions.0": torch.full((1, 1, 1, 2), 0.5)}
    assert FeatureMatchingLoss()(s, t).item() == pytest.approx((5 / 4 + 9 / 3) / 2, abs=1e-6)
    assert FeatureMatchingLoss(["b"])(s, t).item() == pytest.approx(3.0, abs=1e-6)
