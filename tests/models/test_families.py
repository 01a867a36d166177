"""SigLIP and LLaVA wrappers on tiny models built in code: scores, prompts, generation, loading, calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rcc_compression import compress_model, evaluate_model, load_compressed, save_compressed
from rcc_compression.data.calibration import build_calibration_batches
from rcc_compression.errors import CompressionError, DataError
from rcc_compression.models import detect_model_type, get_model, wrap_model


def _images(n: int = 2, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture
def tiny_siglip():
    return get_model("tiny-siglip")


@pytest.fixture
def tiny_llava():
    return get_model("tiny-llava")


def test_siglip_scores_are_the_models_sigmoid_logits(tiny_siglip):
    pix = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = ["a red circle", "two blue squares on the left"]
    img, txt = tiny_siglip.encode_image(pix, normalize=False), tiny_siglip.encode_text(texts, normalize=False)
    assert not torch.allclose(img[0], img[1])
    enc = tiny_siglip.tokenize(texts)
    assert enc["input_ids"].shape[1] == tiny_siglip.max_text_length  # padded to the full length, as trained
    out = tiny_siglip.model(pixel_values=pix, **enc)
    logits = tiny_siglip.compute_similarity(img, txt)
    torch.testing.assert_close(logits, out.logits_per_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiny_siglip.pair_probabilities(img, txt), torch.sigmoid(out.logits_per_image),
                               rtol=1e-5, atol=1e-6)
    # a bias that is not zero: the scores are not the CLIP softmax logits
    assert float(tiny_siglip.logit_bias.detach().abs()) > 0


def test_llava_prompt_has_one_image_position_per_feature(tiny_llava):
    ids = tiny_llava.prompt_ids("what colour is the circle?")
    n = tiny_llava.num_image_tokens
    assert n == (32 // 8) ** 2  # CLIP tower, CLS token dropped (vision_feature_select_strategy default)
    assert ids.count(tiny_llava.image_token_id) == n
    feats = tiny_llava.model.model.get_image_features(pixel_values=torch.randn(1, 3, 32, 32))
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    assert feats[0].shape[0] == n
    with pytest.raises(ValueError, match="exactly once"):
        tiny_llava.prompt_template = "{} :"
        tiny_llava.prompt_ids("x")


def test_llava_training_inputs_score_only_the_target(tiny_llava):
    batch = tiny_llava.training_inputs(["", "what shape is the red object?"], ["a red circle", "circle"])
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    for row in range(2):
        scored = labels[row][labels[row] != -100].tolist()
        assert scored[-1] == tiny_llava.eos_token_id
        assert tiny_llava.image_token_id not in scored
        kept = ids[row][mask[row].bool()].tolist()
        assert kept[-len(scored):] == scored  # the target is the end of the sequence
    assert tiny_llava.decode(labels[1:, :].clamp_min(0)[:, -2:-1]) == ["circle"]
    loss = tiny_llava.compute_loss(torch.randn(2, 3, 32, 32), ["a red circle", "circle"],
                                   ["", "what shape is the red object?"])
    assert torch.isfinite(loss)


@torch.no_grad()
def test_llava_cached_generation_equals_greedy_without_cache(tiny_llava):
    """``generate`` (key/value cache, left-padded batch) writes the tokens a full forward pass argmaxes."""
    pix = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = ["", "what colour is the small circle?"]
    enc = tiny_llava.prompt_inputs(prompts)
    img = tiny_llava.image_token_id
    out = tiny_llava.model.generate(**enc, pixel_values=pix, max_new_tokens=6, do_sample=False,
                                    pad_token_id=tiny_llava.pad_token_id, eos_token_id=None, suppress_tokens=[img])
    new = out[:, enc["input_ids"].shape[1]:]
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([tiny_llava.prompt_ids(prompt)])
        for step in range(6):
            logits = tiny_llava.model(input_ids=ids, pixel_values=pix[row:row + 1], use_cache=False).logits
            nxt = logits[0, -1].index_fill(0, torch.tensor([img]), float("-inf")).argmax()
            assert int(nxt) == int(new[row, step]), (row, step)
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    caps = tiny_llava.generate_caption(pix, max_length=4, num_beams=2)
    answers = tiny_llava.answer(pix, ["what colour is it?", "how many objects are there?"], max_length=3)
    assert len(caps) == 2 and len(answers) == 2 and all(isinstance(a, str) for a in caps + answers)


def test_new_families_load_from_directories(tiny_siglip, tiny_llava, tmp_path):
    for wrapper, kind in ((tiny_siglip, "siglip"), (tiny_llava, "llava")):
        wrapper.save_pretrained(tmp_path / kind)
        loaded = get_model(str(tmp_path / kind))
        assert loaded.model_type == kind and loaded.tokenizer is not None and loaded.image_processor is not None
        assert detect_model_type(wrapper.model.config) == kind
        batch = wrapper.synthetic_batch(2, torch.Generator().manual_seed(0))
        key = "logits" if kind == "llava" else "logits_per_image"
        torch.testing.assert_close(getattr(loaded(**batch), key), getattr(wrapper(**batch), key))
        assert type(wrap_model(loaded.model)) is type(wrapper)
    llava = get_model(str(tmp_path / "llava"))
    assert llava.prompt_template == tiny_llava.prompt_template and llava.caption_prompt == ""
    assert llava.prompt_ids("what colour?") == tiny_llava.prompt_ids("what colour?")


def test_paired_calibration_refuses_noise_and_text_only(tiny_siglip, tiny_llava):
    for wrapper in (tiny_siglip, tiny_llava):
        with pytest.raises(DataError, match="image-text pairs.*allow_unpaired"):
            build_calibration_batches(wrapper, "synthetic", 2, 2, 0)
        assert len(build_calibration_batches(wrapper, "synthetic", 2, 2, 0, allow_unpaired=True)) == 2
    text_only = [{k: v for k, v in b.items() if k != "pixel_values"}
                 for b in build_calibration_batches(tiny_llava, "world", 3, 2, 0)]
    with pytest.raises(DataError, match="no pixel_values.*image-text pairs"):
        compress_model(tiny_llava, 0.5, calibration_data=text_only, progress=False)
    from rcc_compression import CompressionPipeline

    pipe = CompressionPipeline().add_stage("quant", {"bits": 8})
    with pytest.raises(CompressionError, match="calibrates on image-text pairs"):
        pipe.compress(wrap_model(tiny_llava.model))  # not a bundled model: no world data by default


def test_llava_world_calibration_holds_captions_and_questions(tiny_llava):
    batches = build_calibration_batches(tiny_llava, "world", 2, 6, 0)
    prompts = set()
    for b in batches:
        assert set(b) == {"pixel_values", "input_ids", "attention_mask", "labels"}
        for row in range(b["input_ids"].shape[0]):
            ids = b["input_ids"][row][b["labels"][row] == -100]
            ids = ids[(ids != tiny_llava.image_token_id) & (b["attention_mask"][row][b["labels"][row] == -100] == 1)]
            prompts.add(tiny_llava.decode(ids.view(1, -1))[0])
    assert any(p.strip() == ":" for p in prompts)  # the caption prompt
    assert any("?" in p for p in prompts)  # questions
    assert torch.isfinite(tiny_llava.model(**batches[0]).loss)


@pytest.mark.e2e
def test_suite_runs_the_tasks_each_family_has(tiny_siglip, tiny_llava):
    res = evaluate_model(tiny_siglip, ["zero_shot", "retrieval", "captioning"], ["world"], max_items=12,
                         bootstrap_samples=0)
    assert set(res["results"]) == {"zero_shot", "retrieval"}
    assert res["skipped"][0]["benchmark"] == "captioning" and "siglip" in res["skipped"][0]["reason"]
    res = evaluate_model(tiny_llava, ["captioning", "vqa", "zero_shot"], ["world"], max_items=6,
                         bootstrap_samples=0, num_beams=1, max_length=5)
    assert set(res["results"]) == {"captioning", "vqa"}
    assert 0.0 <= res["results"]["vqa"]["world:vqa"]["metrics"]["accuracy"]["value"] <= 1.0


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["tiny-siglip", "tiny-llava"])
def test_compress_save_load_round_trip(name, tmp_path):
    model = compress_model(name, 0.5, progress=False)
    save_compressed(model, tmp_path / "ckpt")
    loaded = load_compressed(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    batch = model.synthetic_batch(2, torch.Generator().manual_seed(0))
    key = "logits" if name == "tiny-llava" else "logits_per_image"
    torch.testing.assert_close(getattr(loaded(**batch), key), getattr(model(**batch), key))
    if name == "tiny-llava":
        pix = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        assert loaded.generate_caption(pix, max_length=5) == model.generate_caption(pix, max_length=5)
