"""SigLIP and LLaVA through the whole round trip: compress, save, load, evaluate, serve, and ONNX (or its refusal)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcc_compression import compress_model, evaluate_model, save_compressed
from rcc_compression.compression.export import load_deployable
from rcc_compression.errors import CheckpointError

from .conftest import decoded, png_b64

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (dev extra) is not installed")

IMGS = [png_b64(i, size=48) for i in range(2)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in ("tiny-siglip", "tiny-llava"):
        model = compress_model(name, 0.5, progress=False)
        save_compressed(model, root / name)
        out[name] = (model, root / name)
    return out


@pytest.fixture(scope="module")
def served(checkpoints):
    from rcc_compression.serving.app import create_app
    from rcc_compression.serving.models import load_models
    from rcc_compression.serving.server import BackgroundServer

    models = load_models([f"siglip={checkpoints['tiny-siglip'][1]}", f"llava={checkpoints['tiny-llava'][1]}"],
                         kernel_batch=2)
    app = create_app(models, None, max_batch=4, batch_wait_ms=10)
    with BackgroundServer(app) as url:
        yield {"url": url, "models": {m.name: m for m in models}}


@pytest.mark.e2e
def test_checkpoints_load_and_evaluate_as_compressed(checkpoints):
    for name, benches in (("tiny-siglip", ["zero_shot", "retrieval"]), ("tiny-llava", ["captioning", "vqa"])):
        model, path = checkpoints[name]
        dep = load_deployable(path)
        assert dep.kind == "compressed" and dep.compressed and dep.wrapper.model_type == name.split("-")[1]
        a = evaluate_model(model, benches, ["world"], max_items=8, bootstrap_samples=0, num_beams=1, max_length=6)
        b = evaluate_model(dep.wrapper, benches, ["world"], max_items=8, bootstrap_samples=0, num_beams=1,
                           max_length=6)
        assert set(a["results"]) == set(benches) and _same_metrics(a, b)


def _same_metrics(a, b) -> bool:
    from rcc_compression.evaluation.suite import flat_metrics

    fa, fb = flat_metrics(a), flat_metrics(b)
    return fa.keys() == fb.keys() and all(abs(fa[k] - fb[k]) < 1e-9 for k in fa)


def test_siglip_served_with_sigmoid_scores(served):
    m = served["models"]["siglip"]
    w = m.wrapper
    assert m.tasks == ("embed_image", "embed_text")
    pics = [decoded(s) for s in IMGS]
    texts = ["a red circle", "two blue squares"]
    with httpx.Client(base_url=served["url"], timeout=30) as c, torch.no_grad():
        sim = c.post("/v1/similarity", json={"model": "siglip", "images": IMGS, "texts": texts}).json()
        logits = w.compute_similarity(w.encode_image(pics), w.encode_text(texts))
        np.testing.assert_allclose(sim["logits_per_image"], logits.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(sim["pair_probabilities"], torch.sigmoid(logits).numpy(), atol=1e-5)
        zs = c.post("/v1/zero-shot", json={"model": "siglip", "images": IMGS, "labels": ["circle", "square"],
                                           "templates": ["a {}"]}).json()
        cls = w.encode_text(["a circle", "a square"])
        ref = torch.sigmoid(w.compute_similarity(w.encode_image(pics), cls)).numpy()
        np.testing.assert_allclose(zs["probs"], ref, atol=1e-5)  # each label's own probability
        r = c.post("/v1/caption", json={"model": "siglip", "images": IMGS})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_task"


def test_llava_caption_and_vqa_served_as_the_python_api(served):
    m = served["models"]["llava"]
    w = m.wrapper
    assert m.tasks == ("caption", "vqa") and m.describe()["compressed_layers"] > 0
    pics = [decoded(s) for s in IMGS]
    with httpx.Client(base_url=served["url"], timeout=60) as c:
        r = c.post("/v1/caption", json={"model": "llava", "images": IMGS, "max_length": 6})
        assert r.status_code == 200 and r.json()["captions"] == w.generate_caption(pics, max_length=6)
        qs = ["what colour is the circle?", "how many shapes are there?"]
        r = c.post("/v1/vqa", json={"model": "llava", "images": IMGS, "questions": qs, "max_length": 4})
        assert r.status_code == 200 and r.json()["answers"] == w.answer(pics, qs, max_length=4)
        r = c.post("/v1/embed/image", json={"model": "llava", "images": IMGS})
        assert r.status_code == 400 and "does not offer embed_image" in r.json()["error"]["message"]


def test_onnx_export_of_a_generative_vlm_is_refused_naming_what_is_missing(checkpoints, tmp_path):
    pytest.importorskip("onnx")
    from rcc_compression.compression.export import export_model

    with pytest.raises(CheckpointError, match="LLaVA.*not supported.*--format hf"):
        export_model(checkpoints["tiny-llava"][1], tmp_path / "onnx", fmt="onnx")
    summary = export_model(checkpoints["tiny-llava"][1], tmp_path / "hf", fmt="hf")
    assert summary["bytes"] > 0


def test_compressed_siglip_exports_to_onnx_and_matches(checkpoints, tmp_path):
    pytest.importorskip("onnxruntime")
    from rcc_compression.compression.export import export_model
    from rcc_compression.compression.onnx_export import run_onnx

    summary = export_model(checkpoints["tiny-siglip"][1], tmp_path / "onnx", fmt="onnx")
    assert set(summary["graphs"]) == {"vision_model.onnx", "text_model.onnx"}
    assert all(g["max_abs_diff"] < 1e-4 for g in summary["graphs"].values())
    model = checkpoints["tiny-siglip"][0]
    pix = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.encode_image(pix, normalize=False).numpy()
    got = run_onnx(tmp_path / "onnx" / "vision_model.onnx", {"pixel_values": pix.numpy()})
    np.testing.assert_allclose(got, ref, atol=1e-4)
