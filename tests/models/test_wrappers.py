"""Model registry and the CLIP/BLIP wrappers on tiny models built in code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rcc_compression.errors import ModelLoadError
from rcc_compression.models import detect_model_type, get_model, wrap_model


def _images(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def test_similarity_matches_hand_computation(tiny_clip):
    img = tiny_clip.encode_image(_images(3), normalize=False)
    txt = tiny_clip.encode_text(["a red circle", "two blue squares"], normalize=False)
    sim = tiny_clip.compute_similarity(img, txt)
    hand = tiny_clip.model.logit_scale.exp() * (img / img.norm(dim=-1, keepdim=True)) @ (
        txt / txt.norm(dim=-1, keepdim=True)).t()
    torch.testing.assert_close(sim, hand)
    # and equals the HF model's own logits on the same inputs
    pix = tiny_clip.prepare_images(_images(3))
    enc = tiny_clip.tokenize(["a red circle", "two blue squares"])
    out = tiny_clip.model(pixel_values=pix, **enc)
    torch.testing.assert_close(sim, out.logits_per_image, rtol=1e-5, atol=1e-5)


def test_captions_are_strings_greedy_and_beam(tiny_blip):
    for beams in (1, 3):
        caps = tiny_blip.generate_caption(_images(2), num_beams=beams, max_length=8)
        assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    loss = tiny_blip.compute_loss(_images(2), ["a red circle", "a blue star"])
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(TypeError):
        tiny_blip.answer(_images(1), "what colour")


def test_vqa_answers(tiny_blip_vqa):
    ans = tiny_blip_vqa.answer(_images(2), "what colour is the circle", max_length=5)
    assert len(ans) == 2 and all(isinstance(a, str) for a in ans)


def test_freeze_layers_freezes_exactly_the_matching(tiny_clip):
    frozen = tiny_clip.freeze_layers([r"^vision_model\.encoder\.layers\.0\.", r"logit_scale"])
    for name, p in tiny_clip.model.named_parameters():
        should = name.startswith("vision_model.encoder.layers.0.") or name == "logit_scale"
        assert p.requires_grad is not should, name
        assert (name in frozen) is should
    assert set(map(id, tiny_clip.get_trainable_parameters())) == {
        id(p) for p in tiny_clip.model.parameters() if p.requires_grad}


def test_registry_local_directory_and_type_detection(tiny_clip, tiny_blip_vqa, tmp_path):
    tiny_clip.save_pretrained(tmp_path / "clip")
    loaded = get_model(str(tmp_path / "clip"))
    assert loaded.model_type == "clip" and loaded.tokenizer is not None
    batch = tiny_clip.synthetic_batch(2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(**batch).logits_per_image, tiny_clip(**batch).logits_per_image)
    tiny_blip_vqa.save_pretrained(tmp_path / "vqa")
    assert detect_model_type(tiny_blip_vqa.model.config.to_dict() | {"architectures": ["BlipForQuestionAnswering"]}) \
        == "blip_vqa"
    assert get_model(str(tmp_path / "vqa")).is_vqa


def test_registry_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no network.*local directory"):
        get_model("openai/clip-vit-base-patch32")
    with pytest.raises(ModelLoadError, match="no such model directory"):
        get_model("./does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        get_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="cannot wrap"):
        wrap_model(torch.nn.Linear(2, 2))
    with pytest.raises(ModelLoadError, match="not blip"):
        get_model("tiny-clip", type="blip")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_or_hostile_weights_are_one_line_errors(tiny_clip, tmp_path):
    import os
    import pickle

    tiny_clip.save_pretrained(tmp_path / "clip")
    weights = tmp_path / "clip" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="cannot load the CLIPModel weights"):
        get_model(str(tmp_path / "clip"))
    weights.unlink()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "clip" / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelLoadError, match="cannot load the CLIPModel weights"):
        get_model(str(tmp_path / "clip"))
    assert not marker.exists()
