"""The model server on 127.0.0.1: each endpoint against the Python API, auth, limits, batching, metrics."""

from __future__ import annotations

import concurrent.futures
import json
import os
import stat
import sys

import numpy as np
import pytest
import torch

from .conftest import compress_quick, decoded, png_b64

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (dev extra) is not installed")

SENTINEL = "rcc-sentinel-7f3a"
_AUDIT = {"on": False, "seen": []}


def _audit(event: str, args: tuple) -> None:
    if _AUDIT["on"] and (event == "open" or event.startswith(("os.", "shutil."))):
        if any(SENTINEL in str(a) for a in args):
            _AUDIT["seen"].append((event, args))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Dense and (encrypted) compressed CLIP, captioning BLIP and VQA BLIP behind one server."""
    from rcc_compression.compression.storage import save_compressed
    from rcc_compression.models import get_model
    from rcc_compression.serving.app import create_app
    from rcc_compression.serving.auth import KeyStore
    from rcc_compression.serving.inputs import ServeLimits
    from rcc_compression.serving.models import load_models
    from rcc_compression.serving.server import BackgroundServer
    from rcc_compression.utils.crypto import generate_key

    ckpt = tmp_path_factory.mktemp("serve") / "clip-small"
    secret = generate_key()
    save_compressed(compress_quick(get_model("rcc-clip-world")), ckpt, encrypt_key=secret)
    models = load_models(["rcc-clip-world", f"clip-small={ckpt}", "rcc-blip-world", "tiny-blip-vqa"], key=secret,
                         kernel_batch=2)
    keys = KeyStore()
    plain = {"all": keys.add("all", ["*"]), "clip": keys.add("clip", ["rcc-clip-world"])}
    limits = ServeLimits(max_body_bytes=150_000, max_image_pixels=96 * 96, max_batch=4, max_text_chars=60,
                         max_caption_tokens=24, max_beams=2, request_timeout_s=20)
    app = create_app(models, keys, limits, max_batch=8, batch_wait_ms=30)
    with BackgroundServer(app) as url:
        yield {"url": url, "keys": plain, "models": {m.name: m.wrapper for m in models}, "app": app}


def client(served, who: str | None = "all") -> httpx.Client:
    headers = {"Authorization": f"Bearer {served['keys'][who]}"} if who else {}
    return httpx.Client(base_url=served["url"], headers=headers, timeout=30)


IMGS = [png_b64(i) for i in range(3)]


@pytest.mark.parametrize("model", ["rcc-clip-world", "clip-small"])
def test_clip_endpoints_match_the_python_api(served, model):
    w = served["models"][model]
    pics = [decoded(s) for s in IMGS]
    texts = ["a red circle", "two blue squares on the left", "a photo"]
    with client(served) as c, torch.no_grad():
        img = np.array(c.post("/v1/embed/image", json={"model": model, "images": IMGS}).json()["embeddings"])
        txt = np.array(c.post("/v1/embed/text", json={"model": model, "texts": texts}).json()["embeddings"])
        np.testing.assert_allclose(img, w.encode_image(pics).numpy(), atol=1e-5)
        np.testing.assert_allclose(txt, w.encode_text(texts).numpy(), atol=1e-5)
        sim = c.post("/v1/similarity", json={"model": model, "images": IMGS[:2], "texts": texts}).json()
        ref = w.compute_similarity(w.encode_image(pics[:2]), w.encode_text(texts)).numpy()
        np.testing.assert_allclose(sim["logits_per_image"], ref, rtol=1e-4, atol=1e-4)
        from rcc_compression.evaluation.zero_shot import classifier_weights

        labels, templates = ["red circle", "blue square"], ["a photo of a {}.", "a {}"]
        zs = c.post("/v1/zero-shot", json={"model": model, "images": IMGS[:2], "labels": labels,
                                           "templates": templates}).json()
        logits = w.logit_scale * w.encode_image(pics[:2]) @ classifier_weights(w, labels, templates).t()
        np.testing.assert_allclose(zs["probs"], logits.softmax(-1).numpy(), atol=1e-5)
        assert zs["top"] == [labels[i] for i in logits.argmax(-1).tolist()]


def test_compressed_model_is_served_with_its_chosen_kernels(served):
    with client(served) as c:
        info = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    assert info["clip-small"]["source_kind"] == "compressed" and info["clip-small"]["compressed_layers"] > 0
    assert sum(info["clip-small"]["kernels"].values()) == info["clip-small"]["compressed_layers"]
    from rcc_compression.compression.layers import compressed_layers

    modes = {m.execution for m in compressed_layers(served["models"]["clip-small"].model).values()}
    assert modes == set(info["clip-small"]["kernels"])


def test_blip_caption_and_vqa_match_the_python_api(served):
    cap, vqa = served["models"]["rcc-blip-world"], served["models"]["tiny-blip-vqa"]
    pics = [decoded(s) for s in IMGS[:2]]
    with client(served) as c:
        r = c.post("/v1/caption", json={"images": IMGS[:2], "max_length": 20})
        assert r.status_code == 200 and r.json()["captions"] == cap.generate_caption(pics, max_length=20)
        qs = ["what colour is the circle", "how many"]
        r = c.post("/v1/vqa", json={"images": IMGS[:2], "questions": qs, "max_length": 6})
        assert r.status_code == 200 and r.json()["answers"] == vqa.answer(pics, qs, max_length=6)
        r = c.post("/v1/caption", json={"model": "rcc-clip-world", "images": IMGS[:1]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_task"


def test_concurrent_requests_are_batched_and_each_gets_its_own_result(served):
    w = served["models"]["rcc-clip-world"]
    imgs = [png_b64(10 + i) for i in range(8)]

    def one(s):
        with client(served) as c:
            return c.post("/v1/embed/image", json={"model": "rcc-clip-world", "images": [s]}).json()["embeddings"][0]

    with client(served) as c:
        before = _metric(c.get("/metrics").text, 'rcc_batch_size_count{model="rcc-clip-world",task="embed_image"}')
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = np.array(list(pool.map(one, imgs)))
    with torch.no_grad():
        np.testing.assert_allclose(got, w.encode_image([decoded(s) for s in imgs]).numpy(), atol=1e-5)
    with client(served) as c:
        after = _metric(c.get("/metrics").text, 'rcc_batch_size_count{model="rcc-clip-world",task="embed_image"}')
    assert after - before < 8, "8 concurrent one-image requests should share batches"


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_keys_401_403(served):
    body = {"model": "rcc-blip-world", "images": IMGS[:1]}
    r = httpx.post(served["url"] + "/v1/caption", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(served["url"] + "/v1/caption", json=body, headers={"Authorization": "Bearer rcc_wrong"})
    assert r.status_code == 401
    r = httpx.post(served["url"] + "/v1/caption", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401, "the key is checked before the body is looked at"
    with client(served, "clip") as c:
        assert c.post("/v1/caption", json=body).status_code == 403
        r = c.post("/v1/caption", json={"images": IMGS[:1]})  # default model: none this key may use
        assert r.status_code == 400
        assert c.post("/v1/embed/text", json={"model": "rcc-clip-world", "texts": ["a"]}).status_code == 200
        assert [m["name"] for m in c.get("/v1/models").json()["models"]] == ["rcc-clip-world"]
        assert c.post("/v1/embed/text", json={"model": "nope", "texts": ["a"]}).status_code == 403
    with client(served) as c:
        assert c.post("/v1/embed/text", json={"model": "nope", "texts": ["a"]}).status_code == 404
        assert c.get("/metrics").status_code == 200
    assert httpx.get(served["url"] + "/metrics").status_code == 401
    assert httpx.get(served["url"] + "/healthz").json() == {"status": "ok"}
    assert httpx.get(served["url"] + "/readyz").json()["ready"] is True


@pytest.mark.parametrize("path,body,status,limit", [
    ("/v1/embed/image", {"images": [png_b64(0, 160, solid=True)]}, 413, "max_image_pixels"),
    ("/v1/embed/image", {"images": [png_b64(0)] * 5}, 413, "max_batch"),
    ("/v1/embed/image", {"images": [png_b64(i) for i in range(12)]}, 413, "max_body_bytes"),
    ("/v1/embed/text", {"texts": ["word " * 20]}, 422, "max_text_chars"),
    ("/v1/caption", {"images": [png_b64(0)], "max_length": 500}, 422, "max_caption_tokens"),
    ("/v1/caption", {"images": [png_b64(0)], "num_beams": 3}, 422, "max_beams"),
    ("/v1/zero-shot", {"images": [png_b64(0)], "labels": ["a", "b", "c"], "templates": ["{}", "a {}"]}, 413,
     "max_batch"),
])
def test_limits_answer_413_or_422_naming_the_limit(served, path, body, status, limit):
    with client(served) as c:
        r = c.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["limit"] == limit


def test_bad_content_is_422(served):
    with client(served) as c:
        for body in ({"images": ["not base64!"]}, {"images": [png_b64(0)[:200]]},
                     {"images": ["data:image/png;base64," + "QUJD"]}, {"images": [png_b64(0)], "extra": 1},
                     {"images": "one"}, {"texts": ["a"]}):
            r = c.post("/v1/embed/image", json=body)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["error"]["code"] in ("invalid_image", "invalid_request")


def test_no_client_given_path_reaches_the_filesystem(served, tmp_path):
    target = tmp_path / f"{SENTINEL}.png"
    target.write_bytes(b"\x89PNG")
    p = str(target)
    bodies = [
        ("/v1/embed/image", {"model": p, "images": [p]}),
        ("/v1/embed/image", {"images": [p, "file://" + p, "data:image/png;base64," + p]}),
        ("/v1/embed/text", {"model": "../" + p, "texts": [p]}),
        ("/v1/zero-shot", {"images": [png_b64(0)], "labels": [SENTINEL], "templates": [p + "{}"]}),
        ("/v1/caption", {"images": [png_b64(0)], "prompt": SENTINEL, "max_length": 5}),
        ("/v1/vqa", {"model": f"tiny-blip-vqa/{SENTINEL}", "images": [png_b64(0)], "questions": [p]}),
    ]
    _AUDIT.update(on=True, seen=[])
    target.read_bytes()  # the hook sees an open of the path when one happens
    assert _AUDIT["seen"], "the audit hook must see opens"
    _AUDIT["seen"] = []
    try:
        with client(served) as c:
            codes = [c.post(path, json=body).status_code for path, body in bodies]
            codes.append(c.get(f"/v1/models/{SENTINEL}").status_code)
    finally:
        _AUDIT["on"] = False
    assert _AUDIT["seen"] == [], _AUDIT["seen"]
    assert all(code != 500 for code in codes), codes


def test_key_file_holds_hashes_only(tmp_path):
    from rcc_compression.errors import ConfigError
    from rcc_compression.serving.auth import KeyStore, hash_key

    store = KeyStore()
    key = store.add("alice", ["rcc-clip-world"])
    path = tmp_path / "keys.json"
    store.save(path)
    text = path.read_text()
    assert key not in text and key[4:20] not in text and hash_key(key) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = KeyStore.load(path)
    assert loaded.verify(key).id == "alice" and loaded.verify(key + "x") is None and loaded.verify("") is None
    assert loaded.verify(key).allows("rcc-clip-world") and not loaded.verify(key).allows("rcc-blip-world")
    assert len(key) >= 40, "keys carry at least 256 bits"
    data = json.loads(text)
    data["keys"][0]["key"] = key
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="plain keys are never stored|exactly the fields"):
        KeyStore.load(path)


def test_a_saved_int8_checkpoint_is_served_in_its_inference_form_with_the_pytorch_outputs(tmp_path):
    """save -> load -> serve -> request: the server answers with what PyTorch computes from the same checkpoint,
    holding only what the checkpoint stores (W8A8 layers on the int8 GEMM)."""
    from rcc_compression.compression.layers import (
        CompressedLinear,
        compressed_layers,
        held_tensor_bytes,
        replace_module,
    )
    from rcc_compression.compression.quant import quantize_nearest
    from rcc_compression.compression.storage import load_compressed, save_compressed
    from rcc_compression.models import get_model
    from rcc_compression.serving.app import create_app
    from rcc_compression.serving.auth import KeyStore
    from rcc_compression.serving.inputs import ServeLimits
    from rcc_compression.serving.models import load_models
    from rcc_compression.serving.server import BackgroundServer

    w = get_model("rcc-clip-world")
    for name in [n for n, m in w.model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]:
        layer = CompressedLinear.from_linear(w.model.get_submodule(name))
        layer.set_quantized("weight", quantize_nearest(layer.weight.detach(), 8))
        layer.set_activations(8)
        replace_module(w.model, name, layer)
    save_compressed(w, tmp_path / "w8a8")
    reference = load_compressed(tmp_path / "w8a8")
    (served,) = load_models([f"w8a8={tmp_path / 'w8a8'}"], kernel_batch=2)
    served_layers = compressed_layers(served.wrapper.model)
    assert all(m.is_compact for m in served_layers.values())
    assert "w8a8" in {m.execution for m in served_layers.values()}  # merged where measured 10 % faster
    assert held_tensor_bytes(reference.model) < 0.5 * held_tensor_bytes(get_model("rcc-clip-world").model)
    keys = KeyStore()
    key = keys.add("all", ["*"])
    app = create_app([served], keys, ServeLimits(), max_batch=8, batch_wait_ms=10)
    texts = ["a red circle", "two blue squares on the left"]
    with BackgroundServer(app) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                                    timeout=30) as c, torch.no_grad():
        answer = c.post("/v1/embed/image", json={"model": "w8a8", "images": IMGS})
        assert answer.status_code == 200, answer.text
        img = np.array(answer.json()["embeddings"])
        txt = np.array(c.post("/v1/embed/text", json={"model": "w8a8", "texts": texts}).json()["embeddings"])
        want_img = reference.encode_image([decoded(s) for s in IMGS]).numpy()
        want_txt = reference.encode_text(texts).numpy()
    # the same codes and the same per-token quantization; the int8 GEMM sums exactly where PyTorch's float
    # path rounds, so an input next to a rounding boundary may take the neighbouring code (as in ONNX export)
    for got, want in ((img, want_img), (txt, want_txt)):
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
        assert (got * want).sum(1).min() > 0.9999  # unit embeddings: cosine
