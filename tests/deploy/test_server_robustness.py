"""What one request can do to a running server on 127.0.0.1, and the server's smaller promises.

One bad item fails only its own request; templates are checked before they are expanded; a
malformed one is 422 with the connection kept; a request that times out stops taking the model's
time; image bombs are refused from their headers; every error is ``{"error": ...}``; /readyz and
/metrics show a key only its own models; a disconnect or a public path costs no body read.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import logging
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch

from .conftest import png_b64

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (dev extra) is not installed")

TIMEOUT_S = 2.0
SLOW_S = 0.25  # the slow model's seconds per text that starts with "slow", and per image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` (with a few bytes of pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bomb_b64(side: int) -> str:
    """A real PNG of ``side x side`` black pixels: a few KB that decode to side^2 x 3 bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, "PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def served():
    from rcc_compression.serving.app import create_app
    from rcc_compression.serving.auth import KeyStore
    from rcc_compression.serving.inputs import ServeLimits
    from rcc_compression.serving.models import ServedModel, load_models
    from rcc_compression.serving.server import BackgroundServer

    class SlowModel(ServedModel):
        """tiny-clip that takes SLOW_S per image and per text starting with "slow" (a sleep: no CPU)."""

        processed: list[str] = []

        def run(self, key, items):
            task = key[0]
            for it in items:
                if task == "embed_image" or (task == "embed_text" and it.startswith("slow")):
                    time.sleep(SLOW_S)
                self.processed.append(it if isinstance(it, str) else "image")
            return super().run(key, items)

    models = load_models(["tiny-clip", "other=tiny-clip"], choose_kernels=False)
    slow = load_models(["slow=tiny-clip"], choose_kernels=False)[0]
    slow.__class__ = SlowModel
    keys = KeyStore()
    plain = {"all": keys.add("all", ["*"]), "one": keys.add("one", ["tiny-clip"]),
             "two": keys.add("two", ["*"])}
    limits = ServeLimits(max_body_bytes=400_000, max_image_pixels=512 * 512, max_request_pixels=600_000,
                         max_key_pixels=1_000_000, max_batch=32, max_text_chars=200, request_timeout_s=TIMEOUT_S)
    app = create_app([*models, slow], keys, limits, max_batch=4, batch_wait_ms=20)
    with BackgroundServer(app) as url:
        yield {"url": url, "keys": plain, "slow": SlowModel, "models": {m.name: m for m in models}}


def client(served, who: str | None = "all") -> httpx.Client:
    headers = {"Authorization": f"Bearer {served['keys'][who]}"} if who else {}
    return httpx.Client(base_url=served["url"], headers=headers, timeout=30)


def post_raw(served, path: str, raw: bytes, who: str = "all") -> httpx.Response:
    """A body sent as given (a lone surrogate escape is valid JSON that httpx would not encode)."""
    return httpx.post(served["url"] + path, content=raw, timeout=30, headers={
        "Authorization": f"Bearer {served['keys'][who]}", "content-type": "application/json"})


# ------------------------------------------------------------------------------ item 7
def test_one_bad_text_fails_only_its_own_request(served):
    texts = [f"a photo of object {i}" for i in range(8)]
    want = served["models"]["tiny-clip"].run(("embed_text",), texts)
    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            good = [pool.submit(lambda t=t: client(served).post("/v1/embed/text", json={"texts": [t]})) for t in texts]
            bad = pool.submit(post_raw, served, "/v1/embed/text", b'{"texts": ["\\ud800"]}')
            good = [f.result() for f in good]
            bad = bad.result()
        assert [r.status_code for r in good] == [200] * 8
        got = np.array([r.json()["embeddings"][0] for r in good])
        np.testing.assert_allclose(got, np.stack(want), atol=1e-5)
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_text", bad.text


# ------------------------------------------------------------------------------ items 8 and 9
def zero_shot(served, templates, labels=("circle", "square"), conn=None):
    body = {"model": "tiny-clip", "images": [png_b64(0)], "labels": list(labels), "templates": templates}
    return client(served).post("/v1/zero-shot", json=body)


@pytest.mark.parametrize("template", ["{0:>10000000}{{}}", "{0.__class__.__mro__}{{}}", "{label.__class__}",
                                      "{}{{}}", "{:>99}"])
def test_format_tricks_are_refused_before_expansion(served, template):
    t = time.monotonic()
    r = zero_shot(served, [template])
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_template", r.text
    assert time.monotonic() - t < 1.0


def test_prompt_length_is_checked_before_expansion(served):
    r = zero_shot(served, ["x" * 195 + " {}"], labels=["a", "longer label"])  # 197 fits, 208 does not
    assert r.status_code == 422 and r.json()["error"]["limit"] == "max_text_chars", r.text
    assert r.json()["error"]["value"] == 196 + len("longer label")
    r = zero_shot(served, ["{}"] * 8, labels=[str(i) for i in range(5)])  # 40 prompts > max_batch 32
    assert r.status_code == 413 and r.json()["error"]["limit"] == "max_batch", r.text


def test_both_placeholders_expand_like_the_python_api(served):
    from rcc_compression.evaluation.zero_shot import classifier_weights

    a = zero_shot(served, ["a photo of a {}.", "{label} drawn"]).json()
    b = zero_shot(served, ["a photo of a {label}.", "{} drawn"]).json()
    assert a["probs"] == b["probs"]
    w = served["models"]["tiny-clip"].wrapper
    from .conftest import decoded

    with torch.no_grad():
        logits = w.logit_scale * w.encode_image([decoded(png_b64(0))]) @ classifier_weights(
            w, ["circle", "square"], ["a photo of a {}.", "{} drawn"]).t()
    np.testing.assert_allclose(a["probs"], logits.softmax(-1).numpy(), atol=1e-5)


@pytest.mark.parametrize("template", ["{1}{}", "{} {}", "{}{", "}{}", "no placeholder", "{label}{}"])
def test_malformed_templates_are_422_and_keep_the_connection(served, template):
    host, port = served["url"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Authorization": f"Bearer {served['keys']['all']}", "content-type": "application/json"}
    body = json.dumps({"model": "tiny-clip", "images": [png_b64(0)], "labels": ["a"], "templates": [template]})
    conn.request("POST", "/v1/zero-shot", body, headers)
    r = conn.getresponse()
    payload = json.loads(r.read())
    assert r.status == 422 and payload["error"]["code"] == "invalid_template", payload
    assert r.getheader("connection") != "close" and conn.sock is not None, "the keep-alive connection was closed"
    local = conn.sock.getsockname()
    conn.request("GET", "/healthz")
    r2 = conn.getresponse()
    assert r2.status == 200 and json.loads(r2.read()) == {"status": "ok"}
    assert conn.sock.getsockname() == local, "the second request needed a new connection"
    conn.close()


# ------------------------------------------------------------------------------ item 10
@pytest.mark.e2e
def test_a_timed_out_request_does_not_keep_the_worker_busy(served):
    served["slow"].processed.clear()
    slow_texts = [f"slow {i}" for i in range(16)]  # 4 s of model time, twice the request timeout

    def slow():
        t = time.monotonic()
        r = client(served).post("/v1/embed/text", json={"model": "slow", "texts": slow_texts})
        return r, time.monotonic() - t

    def fast(i):
        time.sleep(0.1)
        t = time.monotonic()
        r = client(served).post("/v1/embed/text", json={"model": "slow", "texts": [f"fast {i}"]})
        return r, time.monotonic() - t

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        s = pool.submit(slow)
        fasts = [pool.submit(fast, i) for i in range(3)]
        fasts = [f.result() for f in fasts]
        (slow_r, slow_dt) = s.result()
    assert slow_r.status_code == 504, slow_r.text
    for r, dt in fasts:  # answered between the slow request's batches, well within the timeout
        assert r.status_code == 200 and dt < TIMEOUT_S - 0.3, (r.status_code, dt)
    time.sleep(2 * 4 * SLOW_S)  # at most the batch running when the slow request timed out finishes
    done = sum(1 for p in served["slow"].processed if p.startswith("slow"))
    assert done <= 12, f"the abandoned request kept running: {done} of 16 items"
    t = time.monotonic()
    r = client(served).post("/v1/embed/text", json={"model": "slow", "texts": ["fast again"]})
    assert r.status_code == 200 and time.monotonic() - t < 0.5
    # the measured cost now refuses a request that cannot finish in time, before it runs
    before = len(served["slow"].processed)
    t = time.monotonic()
    r = client(served).post("/v1/embed/text", json={"model": "slow", "texts": [f"slow {i}" for i in range(32)]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "would_time_out", r.text
    assert time.monotonic() - t < 0.5 and len(served["slow"].processed) == before


# ------------------------------------------------------------------------------ item 11 and 13 (413)
@pytest.mark.parametrize("image,limit", [
    (bomb_b64(4096), "max_image_pixels"),
    (base64.b64encode(png_header_only(100_000, 100_000)).decode(), "max_image_pixels"),
    (base64.b64encode(png_header_only(600, 100)).decode(), None),  # within limits: decoding fails, 422
])
def test_image_bombs_are_refused_from_their_header(served, image, limit):
    assert len(image) < 100_000
    r = client(served).post("/v1/embed/image", json={"model": "tiny-clip", "images": [image]})
    if limit is None:
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_image", r.text
    else:
        assert r.status_code == 413 and r.json()["error"]["limit"] == limit, r.text


@pytest.mark.e2e
def test_pixels_are_bounded_per_request_and_per_key(served):
    img = bomb_b64(500)  # 250,000 pixels each
    r = client(served).post("/v1/embed/image", json={"model": "tiny-clip", "images": [img] * 3})
    assert r.status_code == 413 and r.json()["error"]["limit"] == "max_request_pixels", r.text
    body = {"model": "slow", "images": [img] * 2}  # 500,000 pixels, held ~0.5 s by the slow model

    def send(who, delay):
        time.sleep(delay)
        return client(served, who).post("/v1/embed/image", json=body)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(send, "all", 0), pool.submit(send, "all", 0.05), pool.submit(send, "all", 0.25),
                pool.submit(send, "two", 0.25)]
        codes = [f.result().status_code for f in futs]
    assert codes[:2] == [200, 200] and codes[3] == 200, codes  # 1,000,000 in flight for "all": the limit
    assert codes[2] == 429, codes  # a third while both are in flight; another key is not affected
    assert client(served).post("/v1/embed/image", json=body).status_code == 200  # released when answered


# ------------------------------------------------------------------------------ item 13
def test_every_error_is_an_error_object(served):
    with client(served) as c:
        r404 = c.get("/v1/nothing-here")
        r405 = c.get("/v1/embed/text")
        r400 = c.post("/v1/caption", json={"model": "tiny-clip", "images": [png_b64(0)]})
        bad_json = c.post("/v1/embed/text", content=b"{not json", headers={"content-type": "application/json"})
    for r, status in ((r404, 404), (r405, 405), (r400, 400), (bad_json, 422)):
        assert r.status_code == status and set(r.json()) == {"error"}, r.text
        assert r.json()["error"]["code"] and r.json()["error"]["message"]
    assert r405.headers.get("allow") == "POST"


def test_readyz_and_metrics_show_a_key_only_its_models(served):
    anon = httpx.get(served["url"] + "/readyz").json()
    assert anon == {"ready": True}, "no model list without a key"
    with client(served, "one") as c:
        assert c.get("/readyz").json() == {"ready": True, "models": ["tiny-clip"]}
        c.post("/v1/embed/text", json={"model": "tiny-clip", "texts": ["a"]})
        mine = c.get("/metrics").text
    with client(served, "all") as c:
        c.post("/v1/embed/text", json={"model": "other", "texts": ["a"]})
        everything = c.get("/metrics").text
    assert 'model="other"' in everything and 'model="tiny-clip"' in everything
    assert 'model="other"' not in mine and 'model="slow"' not in mine and 'model="tiny-clip"' in mine


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_disconnect_mid_body_logs_no_traceback_and_public_paths_read_no_body(served):
    cap = _Capture()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "uvicorn", "fastapi", "starlette")]
    for lg in loggers:
        lg.addHandler(cap)
    host, port = served["url"].removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/embed/text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + served["keys"]["all"].encode() + b"\r\n"
                      b"Content-Length: 5000\r\n\r\n{\"texts\": [\"")
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        for lg in loggers:
            lg.removeHandler(cap)
    text = "\n".join(r.getMessage() + (str(r.exc_info) if r.exc_info else "") for r in cap.records)
    assert not any(r.exc_info for r in cap.records) and "Traceback" not in text, text
    # a public path answers at once, without waiting for (or reading) a body nobody authenticated
    with socket.create_connection((host, int(port))) as s:
        s.settimeout(5)
        t = time.monotonic()
        s.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        head = s.recv(4096)
        assert time.monotonic() - t < 1.0 and head.startswith(b"HTTP/1.1 405"), head


def test_server_threads_are_left_clean(served):
    names = [t.name for t in threading.enumerate()]
    assert sum(n.startswith("rcc-decode") for n in names) <= 2
