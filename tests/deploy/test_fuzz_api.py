"""Schemathesis on the server's own OpenAPI schema: generated requests (valid and invalid) to every endpoint of a
server on 127.0.0.1 in this process; none may be answered 500 or log a traceback. Examples are bounded
(derandomised, a fixed number per endpoint) so the run takes seconds."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (dev extra) is not installed")
from hypothesis import HealthCheck, settings  # noqa: E402

EXAMPLES = 25  # per endpoint and generation mode (positive and negative)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server():
    from rcc_compression.serving.app import create_app
    from rcc_compression.serving.auth import KeyStore
    from rcc_compression.serving.inputs import ServeLimits
    from rcc_compression.serving.models import load_models
    from rcc_compression.serving.server import BackgroundServer

    models = load_models(["tiny-clip", "tiny-blip", "tiny-blip-vqa"], choose_kernels=False)
    keys = KeyStore()
    key = keys.add("fuzz", ["*"])
    limits = ServeLimits(max_body_bytes=64_000, max_batch=8, max_text_chars=64, max_caption_tokens=8,
                         max_beams=2, request_timeout_s=10)
    app = create_app(models, keys, limits, max_batch=8, batch_wait_ms=1)
    errors = _Errors()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "uvicorn", "fastapi", "starlette")]
    for lg in loggers:
        lg.addHandler(errors)
    with BackgroundServer(app) as url:
        yield {"url": url, "key": key, "schema": app.openapi(), "errors": errors}
    for lg in loggers:
        lg.removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]


ENDPOINTS = [("/v1/embed/image", "POST"), ("/v1/embed/text", "POST"), ("/v1/similarity", "POST"),
             ("/v1/zero-shot", "POST"), ("/v1/caption", "POST"), ("/v1/vqa", "POST"), ("/v1/models", "GET"),
             ("/healthz", "GET"), ("/readyz", "GET"), ("/metrics", "GET")]


CASES = [(p, m, mode) for p, m in ENDPOINTS for mode in (("positive", "negative") if m == "POST" else ("positive",))]


@pytest.mark.e2e
@pytest.mark.parametrize("path,method,mode", CASES)  # a GET without parameters has no invalid form
def test_no_generated_request_gets_a_500(server, path, method, mode):
    from hypothesis import given
    from schemathesis import GenerationMode

    operation = schemathesis.openapi.from_dict(server["schema"])[path][method]
    headers = {"Authorization": f"Bearer {server['key']}"}
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(GenerationMode(mode)))
    def check(case):
        response = case.call(base_url=server["url"], headers=headers, timeout=20)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500 or response.status_code in (503, 504), (response.status_code,
                                                                                    response.text)
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}, response.text
        assert not server["errors"].records, [r.getMessage() for r in server["errors"].records]

    check()
    assert sum(seen.values()) >= 1


def test_the_schema_covers_every_endpoint(server):
    paths = {(p, m.upper()) for p, ops in server["schema"]["paths"].items() for m in ops}
    assert set(ENDPOINTS) <= paths
