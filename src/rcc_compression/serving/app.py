"""The model server: FastAPI endpoints over dynamically batched CLIP/BLIP models.

Endpoints (JSON in and out; images as base64):

- ``POST /v1/embed/image``, ``/v1/embed/text``, ``/v1/similarity``, ``/v1/zero-shot`` (CLIP)
- ``POST /v1/caption`` (BLIP captioning), ``/v1/vqa`` (BLIP question answering)
- ``GET /v1/models``, ``/healthz`` (alive), ``/readyz`` (models loaded, batchers running),
  ``/metrics`` (Prometheus), and FastAPI's ``/docs`` and ``/openapi.json``.

Every ``/v1`` route and ``/metrics`` needs an API key (``Authorization: Bearer KEY`` or
``X-API-Key``) unless the app was built without a key store; the key must be allowed the model
(401 without a valid key, 403 for a model it may not use). ``/metrics`` shows the per-model
figures of the models the key may use only, and ``/readyz`` names models only to a valid key
(those it may use). Limits are checked before any work: the body size and read time in the outer
ASGI guard (which reads no body of a public path), the rest per field (413 for size, 422 for
content, both as ``{"error": {"code", "message", "limit", "value", "max"}}``); every error,
404 and 405 included, has that ``{"error": ...}`` form. One request cannot take the others down:
a bad item fails only its own request (4xx), a request whose estimated model time exceeds what
its deadline leaves is refused before it runs (503), and a request that times out stops taking
the model's time at the next batch boundary (see :mod:`.batching`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import KeyRecord, KeyStore, bearer_key
from .batching import DynamicBatcher, ItemFailed, QueueFull, WouldTimeOut
from .inputs import (
    LimitError,
    ServeLimits,
    check_batch,
    check_texts,
    decode_image,
    expand_templates,
    over,
    probe_images,
)
from .models import ServedModel

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
ANONYMOUS = KeyRecord("anonymous", "0" * 64, ("*",))
DEFAULT_TEMPLATES = ("a photo of a {}.",)
_SCOPE_KEY, _SCOPE_T0 = "rcc.key", "rcc.t0"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="Served model name (default: the first that offers the task).")


class ImagesRequest(_Request):
    images: list[str] = Field(description="Base64 images (PNG, JPEG, WebP, BMP); a data: URL prefix is accepted.")


class TextsRequest(_Request):
    texts: list[str]


class SimilarityRequest(ImagesRequest):
    texts: list[str]


class ZeroShotRequest(ImagesRequest):
    labels: list[str] = Field(description="Class names.")
    templates: list[str] | None = Field(None, description="Prompt templates, each with exactly one placeholder, "
                                                         "'{}' or '{label}', for the class name and no other brace.")


class CaptionRequest(ImagesRequest):
    max_length: int = Field(20, ge=1)
    num_beams: int = Field(1, ge=1)
    prompt: str | None = None


class VQARequest(ImagesRequest):
    questions: list[str] = Field(description="One question per image, or one for all.")
    max_length: int = Field(10, ge=1)
    num_beams: int = Field(1, ge=1)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers


class SafeJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: text a client sent (a lone surrogate in a field name
    echoed by a validation error) can always be written."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return SafeJSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 413: "limit_exceeded", 415: "unsupported_media_type"}


class PixelBudget:
    """Pixels of decoded images each key holds right now (a request holds its images' until it is answered).

    Only the event loop touches it, so it needs no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, who: str, pixels: int) -> Any:
        used = self.used.get(who, 0)
        if used + pixels > self.limit:
            raise ApiError(429, "too_many_pixels", f"this key has {used} image pixels in flight; {pixels} more "
                                                   f"exceed max_key_pixels={self.limit}; retry when its other "
                                                   "requests are answered", {"Retry-After": "1"})
        self.used[who] = used + pixels
        try:
            yield
        finally:
            self.used[who] -= pixels
            if not self.used[who]:
                del self.used[who]


_MODEL_LABEL = re.compile(r'model="((?:[^"\\]|\\.)*)"')


def scoped_metrics(text: str, record: KeyRecord) -> str:
    """The Prometheus text without the samples of models ``record`` may not use."""
    if "*" in record.models:
        return text
    keep = []
    for line in text.splitlines():
        found = _MODEL_LABEL.search(line)
        if found is None or line.startswith("#") or record.allows(found.group(1)):
            keep.append(line)
    return "\n".join(keep) + "\n"


# ------------------------------------------------------------------------------ metrics
class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    ENDPOINTS = ("/v1/embed/image", "/v1/embed/text", "/v1/similarity", "/v1/zero-shot", "/v1/caption", "/v1/vqa",
                 "/v1/models", "/healthz", "/readyz", "/metrics")

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("rcc_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("rcc_request_latency_seconds", "Request latency", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.batch = Histogram("rcc_batch_size", "Items per model batch", ["model", "task"],
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.errors = Counter("rcc_errors", "Error responses by endpoint and code", ["endpoint", "code"],
                              registry=self.registry)

    def endpoint(self, path: str) -> str:
        return path if path in self.ENDPOINTS else "other"

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ------------------------------------------------------------------------------ the outer guard
class _BodyTooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class Guard:
    """ASGI middleware run before routing: API key, body size and read time, request metrics.

    A request without a valid key is refused before its body is read; the body is read whole (up
    to ``max_body_bytes``, within the request timeout) and handed on, so no handler ever sees an
    over-long body. No body of a public path is read (they take none: 405 at once). A client that
    disconnects while its body is read is dropped quietly.
    """

    def __init__(self, app: Any, keys: KeyStore | None, limits: ServeLimits, metrics: Metrics) -> None:
        self.app, self.keys, self.limits, self.metrics = app, keys, limits, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        scope[_SCOPE_T0] = t0
        endpoint = self.metrics.endpoint(scope["path"])
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_wrapper, endpoint)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - t0)

    async def _reply(self, send: Callable, status: int, body: dict, endpoint: str,
                     headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self.metrics.errors.labels(endpoint, body["error"]["code"]).inc()
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": data})

    async def _guarded(self, scope: dict, receive: Callable, send: Callable, endpoint: str) -> None:
        if scope["path"] in PUBLIC_PATHS:
            # a key is optional here; given and valid, /readyz names the models it may use
            scope[_SCOPE_KEY] = ANONYMOUS if self.keys is None else self.keys.verify(bearer_key(scope["headers"]))
            await self.app(scope, receive, send)  # public paths take no body: it is never read
            return
        if self.keys is None:
            scope[_SCOPE_KEY] = ANONYMOUS
        else:
            record = self.keys.verify(bearer_key(scope["headers"]))
            if record is None:
                await self._reply(send, 401, {"error": {"code": "unauthorized", "message":
                                  "a valid API key is required (Authorization: Bearer KEY or X-API-Key)"}},
                                  endpoint, {"WWW-Authenticate": "Bearer"})
                return
            scope[_SCOPE_KEY] = record
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        declared = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            err = over("max_body_bytes", int(declared) if declared.isdigit() else declared, limit, "request body")
            await self._reply(send, 413, err.body(), endpoint)
            return
        try:
            body = await asyncio.wait_for(self._read(receive, limit), self.limits.request_timeout_s)
        except _Disconnected:
            return  # nobody to answer; not an error of the server
        except _BodyTooLarge:
            await self._reply(send, 413, over("max_body_bytes", f">{limit}", limit, "request body").body(), endpoint)
            return
        except asyncio.TimeoutError:
            await self._reply(send, 408, {"error": {"code": "timeout", "message": "request body not received within "
                              f"request_timeout_s={self.limits.request_timeout_s}"}}, endpoint)
            return
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _read(receive: Callable, limit: int) -> bytes:
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _Disconnected
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)


# ------------------------------------------------------------------------------ the app
class _Runtime:
    """What the endpoints share: the models, limits, batchers, the pixel budget and the decoding threads."""

    def __init__(self, models: list[ServedModel], limits: ServeLimits, batchers: dict[str, DynamicBatcher]) -> None:
        self.models, self.limits, self.batchers = models, limits, batchers
        self.by_name = {m.name: m for m in models}
        self.budget = PixelBudget(limits.max_key_pixels)
        # image decoding runs on two threads of its own: a burst of large images cannot take every core
        self.decoder = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="rcc-decode")

    def resolve(self, request: Request, name: str | None, task: str) -> ServedModel:
        record: KeyRecord = request.scope.get(_SCOPE_KEY, ANONYMOUS)
        if name is None:
            offering = [m for m in self.models if task in m.tasks and record.allows(m.name)]
            if not offering:
                raise ApiError(400, "unsupported_task", f"no served model this key may use offers {task}")
            return offering[0]
        if not record.allows(name):  # before the lookup: a key learns nothing about models it may not use
            raise ApiError(403, "forbidden", f"this API key may not use model {name[:100]!r}")
        served = self.by_name.get(name)
        if served is None:
            allowed = [n for n in self.by_name if record.allows(n)]
            raise ApiError(404, "unknown_model", f"no served model {name[:100]!r}; served: {allowed}")
        if task not in served.tasks:
            raise ApiError(400, "unsupported_task", f"model {name!r} ({served.kind}) does not offer {task}; "
                                                     f"it offers {list(served.tasks)}")
        return served

    async def run(self, request: Request, served: ServedModel, key: tuple, items: list[Any]) -> list[Any]:
        deadline = request.scope.get(_SCOPE_T0, time.monotonic()) + self.limits.request_timeout_s
        left = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self.batchers[served.name].submit(key, items, deadline), max(left, 0.001))
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no answer within request_timeout_s={self.limits.request_timeout_s}"
                           ) from None
        except WouldTimeOut as exc:
            raise ApiError(503, "would_time_out", f"not started: {exc} (request_timeout_s="
                                                  f"{self.limits.request_timeout_s}); send fewer items") from None
        except QueueFull as exc:
            raise ApiError(503, "overloaded", str(exc), {"Retry-After": "1"}) from None
        except ItemFailed as exc:  # the batch's other requests were answered
            raise ApiError(422, "unprocessable_input", f"the model failed on this request's input ({exc})") from None
        except ValueError as exc:  # the model refused the parameters (same for the whole batch: same key)
            raise ApiError(422, "invalid_request", str(exc).splitlines()[0][:300]) from None

    @contextlib.asynccontextmanager
    async def images(self, request: Request, data: list[str]) -> AsyncIterator[list[Any]]:
        """The request's images decoded, their pixels counted against its key until the request is answered."""
        check_batch(len(data), self.limits, "images")
        loop = asyncio.get_running_loop()
        raws, infos = await loop.run_in_executor(self.decoder, probe_images, data, self.limits)
        record: KeyRecord = request.scope.get(_SCOPE_KEY, ANONYMOUS)
        with self.budget.hold(record.id, sum(i.pixels for i in infos)):
            yield await loop.run_in_executor(
                self.decoder, lambda: [decode_image(r, self.limits, i) for i, r in enumerate(raws)])

    def texts(self, data: list[str], what: str) -> list[str]:
        check_batch(len(data), self.limits, what)
        check_texts(data, self.limits, what)
        return data

    def generation(self, max_length: int, num_beams: int) -> None:
        if max_length > self.limits.max_caption_tokens:
            raise over("max_caption_tokens", max_length, self.limits.max_caption_tokens, "max_length", status=422)
        if num_beams > self.limits.max_beams:
            raise over("max_beams", num_beams, self.limits.max_beams, "num_beams", status=422)

    @staticmethod
    def rows(vectors: list[np.ndarray]) -> list[list[float]]:
        return [v.astype(float).tolist() for v in vectors]

    async def embed_pair(self, request: Request, served: ServedModel, imgs: list[str], txts: list[str]
                         ) -> tuple[np.ndarray, np.ndarray]:
        async with self.images(request, imgs) as pics:
            img, txt = await asyncio.gather(self.run(request, served, ("embed_image",), pics),
                                            self.run(request, served, ("embed_text",), txts))
        return np.stack(img), np.stack(txt)

    @staticmethod
    def logit_scale(served: ServedModel) -> float:
        return float(served.wrapper.logit_scale.detach())

    @staticmethod
    def pair_logits(served: ServedModel, cos: np.ndarray) -> np.ndarray:
        """The model's image-text logits from cosines: ``scale * cos`` (CLIP), ``scale * cos + bias`` (SigLIP)."""
        bias = getattr(served.wrapper, "logit_bias", None)
        return _Runtime.logit_scale(served) * cos + (float(bias.detach()) if bias is not None else 0.0)

    @staticmethod
    def sigmoid_scores(served: ServedModel) -> bool:
        """Whether the model scores each pair on its own (SigLIP's sigmoid) rather than a softmax over texts."""
        return served.kind == "siglip"


def create_app(models: list[ServedModel], keys: KeyStore | None, limits: ServeLimits | None = None,
               max_batch: int = 16, batch_wait_ms: float = 5.0, max_queue: int = 256) -> FastAPI:
    """The FastAPI app serving ``models``. ``keys=None`` turns authentication off (``--no-auth``)."""
    if not models:
        raise ValueError("create_app needs at least one model")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"served model names must differ: {names}")
    limits = limits or ServeLimits()
    metrics = Metrics()

    def observer(name: str) -> Callable[[Any, int], None]:
        return lambda key, n: metrics.batch.labels(name, key[0]).observe(n)

    batchers = {m.name: DynamicBatcher(m.run, max_batch=max_batch, max_wait_s=batch_wait_ms / 1000,
                                       max_queue=max_queue, name=m.name, on_batch=observer(m.name))
                for m in models}
    state = {"ready": False}
    rt = _Runtime(models, limits, batchers)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        for b in batchers.values():
            b.start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            for b in batchers.values():
                await b.close()
            rt.decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="rcc-compression model server", lifespan=lifespan, default_response_class=SafeJSONResponse,
                  description="Embeddings, similarity and zero-shot (CLIP); captions and answers (BLIP).")
    app.state.metrics, app.state.limits, app.state.models = metrics, limits, rt.by_name

    _install_error_handlers(app, metrics)
    _install_routes(app, rt, metrics, state)
    app.add_middleware(Guard, keys=keys, limits=limits, metrics=metrics)
    return app


def _install_routes(app: FastAPI, rt: _Runtime, metrics: Metrics, state: dict[str, bool]) -> None:
    """The endpoints of :func:`create_app`: one router per group."""
    app.include_router(_embedding_routes(rt))
    app.include_router(_generation_routes(rt))
    app.include_router(_service_routes(rt, metrics, state))


def _embedding_routes(rt: _Runtime) -> APIRouter:
    """Embeddings, similarity and zero-shot classification (CLIP, SigLIP)."""
    router = APIRouter()

    @router.post("/v1/embed/image")
    async def embed_image(body: ImagesRequest, request: Request) -> dict[str, Any]:
        """L2-normalised image embeddings (CLIP)."""
        served = rt.resolve(request, body.model, "embed_image")
        async with rt.images(request, body.images) as pics:
            vecs = await rt.run(request, served, ("embed_image",), pics)
        return {"model": served.name, "embeddings": rt.rows(vecs)}

    @router.post("/v1/embed/text")
    async def embed_text(body: TextsRequest, request: Request) -> dict[str, Any]:
        """L2-normalised text embeddings (CLIP)."""
        served = rt.resolve(request, body.model, "embed_text")
        vecs = await rt.run(request, served, ("embed_text",), rt.texts(body.texts, "texts"))
        return {"model": served.name, "embeddings": rt.rows(vecs)}

    @router.post("/v1/similarity")
    async def similarity(body: SimilarityRequest, request: Request) -> dict[str, Any]:
        """Cosine similarity and the model's scores, images x texts (SigLIP adds each pair's probability)."""
        served = rt.resolve(request, body.model, "embed_image")
        img, txt = await rt.embed_pair(request, served, body.images, rt.texts(body.texts, "texts"))
        cos = img @ txt.T
        logits = rt.pair_logits(served, cos)
        out = {"model": served.name, "cosine": cos.astype(float).tolist(),
               "logits_per_image": logits.astype(float).tolist()}
        if rt.sigmoid_scores(served):
            out["pair_probabilities"] = (1 / (1 + np.exp(-logits))).astype(float).tolist()
        return out

    @router.post("/v1/zero-shot")
    async def zero_shot(body: ZeroShotRequest, request: Request) -> dict[str, Any]:
        """Class probabilities of each image over ``labels`` (prompt-ensembled over ``templates``)."""
        served = rt.resolve(request, body.model, "embed_image")
        templates = list(body.templates or DEFAULT_TEMPLATES)
        rt.texts(templates, "templates")
        labels = rt.texts(body.labels, "labels")
        check_batch(len(body.images), rt.limits, "images")
        prompts = expand_templates(templates, labels, rt.limits)  # checked, then built: no str.format
        img, txt = await rt.embed_pair(request, served, body.images, prompts)
        cls = txt.reshape(len(labels), len(templates), -1).mean(axis=1)
        cls /= np.linalg.norm(cls, axis=-1, keepdims=True)
        logits = rt.pair_logits(served, img @ cls.T)
        if rt.sigmoid_scores(served):  # SigLIP: each label's own probability (they need not sum to 1)
            probs = 1 / (1 + np.exp(-logits))
        else:
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
        return {"model": served.name, "labels": labels, "probs": probs.astype(float).tolist(),
                "top": [labels[i] for i in probs.argmax(axis=1)]}

    return router


def _generation_routes(rt: _Runtime) -> APIRouter:
    """Captions and answers to questions (BLIP, LLaVA)."""
    router = APIRouter()

    @router.post("/v1/caption")
    async def caption(body: CaptionRequest, request: Request) -> dict[str, Any]:
        """Captions (BLIP; greedy with num_beams=1, beam search otherwise)."""
        served = rt.resolve(request, body.model, "caption")
        rt.generation(body.max_length, body.num_beams)
        if body.prompt is not None:
            rt.texts([body.prompt], "prompt")
        async with rt.images(request, body.images) as pics:
            out = await rt.run(request, served, ("caption", body.max_length, body.num_beams, body.prompt or ""), pics)
        return {"model": served.name, "captions": out}

    @router.post("/v1/vqa")
    async def vqa(body: VQARequest, request: Request) -> dict[str, Any]:
        """Answers to questions about images (BLIP VQA)."""
        served = rt.resolve(request, body.model, "vqa")
        rt.generation(body.max_length, body.num_beams)
        questions = rt.texts(body.questions, "questions")
        if len(questions) not in (1, len(body.images)):
            raise LimitError(422, "invalid_request", f"give one question per image ({len(body.images)}) or one "
                                                     f"for all, not {len(questions)}")
        async with rt.images(request, body.images) as pics:
            qs = questions * len(pics) if len(questions) == 1 else questions
            out = await rt.run(request, served, ("vqa", body.max_length, body.num_beams),
                            list(zip(pics, qs, strict=True)))
        return {"model": served.name, "answers": out}

    return router


def _service_routes(rt: _Runtime, metrics: Metrics, state: dict[str, bool]) -> APIRouter:
    """The served models, liveness, readiness and Prometheus metrics."""
    router = APIRouter()
    names = [m.name for m in rt.models]

    @router.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        """The served models this key may use."""
        record: KeyRecord = request.scope.get(_SCOPE_KEY, ANONYMOUS)
        return {"models": [m.describe() for m in rt.models if record.allows(m.name)]}

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz(request: Request) -> Response:
        """Readiness: models loaded and every batcher running; with a valid key, the models it may use."""
        ok = state["ready"] and all(b.running for b in rt.batchers.values())
        body: dict[str, Any] = {"ready": ok}
        record: KeyRecord | None = request.scope.get(_SCOPE_KEY)
        if record is not None:
            body["models"] = [n for n in names if record.allows(n)]
        return SafeJSONResponse(body, status_code=200 if ok else 503)

    @router.get("/metrics")
    async def prometheus(request: Request) -> Response:
        """Prometheus metrics: requests, latency histogram, batch sizes, errors (per-model ones of the key's
        models only)."""
        data, ctype = metrics.render()
        record: KeyRecord = request.scope.get(_SCOPE_KEY, ANONYMOUS)
        return Response(scoped_metrics(data.decode(), record), media_type=ctype)

    return router


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error answer as ``{"error": {"code", "message", ...}}`` (FastAPI's 404/405/422 included)."""

    def fail(request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
             ) -> JSONResponse:
        metrics.errors.labels(metrics.endpoint(request.url.path), code).inc()
        return _error(status, code, message, headers)

    @app.exception_handler(LimitError)
    async def _limit(request: Request, exc: LimitError) -> JSONResponse:
        metrics.errors.labels(metrics.endpoint(request.url.path), exc.code).inc()
        return SafeJSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return fail(request, exc.status, exc.code, str(exc), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no endpoint {request.url.path[:100]!r}; see /docs"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path[:100]!r}"
        return fail(request, exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), message,
                    dict(exc.headers) if exc.headers else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                   for e in exc.errors()[:10]]
        metrics.errors.labels(metrics.endpoint(request.url.path), "invalid_request").inc()
        return SafeJSONResponse({"error": {"code": "invalid_request", "message": "request does not match the schema",
                                       "details": details}}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return fail(request, 500, "internal", f"{type(exc).__name__} while serving the request")
