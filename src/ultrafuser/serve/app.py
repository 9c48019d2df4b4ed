"""The app factory and thin routes: read the body, call a handler, wrap the result.

Routes: `GET /` (the chat page), `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`,
`POST /v1/chat/completions`, `POST /v1/completions`. No OpenAPI/docs routes (FastAPI's docs page loads
assets from a CDN; this server serves nothing from outside).

`/health` answers without a key: status ("ok" | "draining", 503 while draining) and load counters
(waiting / running rows, batches, generated tokens) - no request content.

API key (optional): when set, every route needs `Authorization: Bearer KEY` except `OPEN_PATHS`: `/health`
(for load balancers). The page at `/` is covered too, so with a key set a browser needs to send the header (a
header-setting extension, or a reverse proxy that adds it); without a key — the local default — it opens as is. The check is a pure ASGI middleware in front of routing (so unknown paths answer 401,
not 404, to a caller without the key), compares SHA-256 digests with `hmac.compare_digest` (constant time,
length not leaked), and never logs the key.

Errors always have OpenAI's shape {"error": {"message", "type", "param", "code"}} - for 404/405 from routing
and for unexpected exceptions (500) too. Streams are server-sent events, one `data: {json}` per chunk,
ending with `data: [DONE]`. A client that goes away (stream or not) cancels its job: the engine drops it
from the queue or ends its rows at the next decode step.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from contextlib import aclosing, asynccontextmanager
from importlib import resources

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse, Response

from ultrafuser.serve import handlers
from ultrafuser.serve.engine import Engine
from ultrafuser.serve.protocol import APIError, Limits, error_body, now

log = logging.getLogger("ultrafuser.serve")

OPEN_PATHS = frozenset({"/health"})
_PAGE_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
             "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class APIKeyMiddleware:
    """Require `Authorization: Bearer KEY` on every HTTP path but `open_paths`."""

    def __init__(self, app, api_key: str | None, open_paths=OPEN_PATHS):
        self.app = app
        self.digest = None if not api_key else hashlib.sha256(api_key.encode()).digest()
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if self.digest is None or scope["type"] == "lifespan" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = b""
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                given = v
                break
        token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
        if hmac.compare_digest(hashlib.sha256(token).digest(), self.digest) and token:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # no websocket routes; refuse before accepting all the same
            return await send({"type": "websocket.close", "code": 1008})
        body = error_body("missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error",
                          None, "invalid_api_key")
        resp = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)


class EventStreamResponse(Response):
    """Server-sent events from an async iterator of payloads; calls `on_disconnect` when the client leaves."""

    media_type = "text/event-stream"

    def __init__(self, payloads, on_disconnect):
        self.payloads, self.on_disconnect = payloads, on_disconnect
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as tg:

            async def watch():
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.on_disconnect()
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            complete = False
            try:
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                async with aclosing(self.payloads) as it:
                    async for data in it:
                        await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(),
                                    "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                complete = True
            except OSError:  # the connection broke while sending
                pass
            finally:
                if not complete:  # broken, disconnected, or cancelled (e.g. the graceful-shutdown timeout)
                    self.on_disconnect()
                tg.cancel_scope.cancel()


class _ClientGone(Exception):
    pass


async def _until_disconnect(coro, receive, on_disconnect):
    """Await `coro`; if the client disconnects first, call `on_disconnect` and raise _ClientGone."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        on_disconnect()
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    on_disconnect()
    task.cancel()
    raise _ClientGone


async def read_body(request: Request, limits: Limits) -> bytes:
    """Content type first (415), then size (413, from Content-Length before reading, or while reading)."""
    handlers.check_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise handlers.too_large(limits.max_body_bytes)
    chunks, size = [], 0

    async def read():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise handlers.too_large(limits.max_body_bytes)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), limits.body_read_timeout_s)
    except ClientDisconnect:
        raise _ClientGone from None
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body took longer than {limits.body_read_timeout_s:g} s to arrive",
                       "invalid_request_error", None, "request_timeout") from None
    return b"".join(chunks)


def _page() -> str:
    return resources.files("ultrafuser.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(model, *, model_name: str = "ultrafuser", limits: Limits | None = None, api_key: str | None = None,
               threads: int | None = None) -> FastAPI:
    """An OpenAI-compatible app over a loaded `FusedModel`. The engine thread starts and stops with the app's
    lifespan; `app.state.engine.begin_drain()` makes it refuse new requests (503) while in-flight ones finish."""
    limits = limits or Limits()
    engine = Engine(model, max_batch=limits.max_batch, max_queue=limits.max_queue,
                    context_length=limits.context_length, threads=threads)
    created = now()
    page = _page()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="UltraFuser", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.limits, app.state.model_name = engine, limits, model_name
    app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):  # not expected: routes parse bodies themselves
        return JSONResponse(error_body(str(e), "invalid_request_error"), status_code=400)

    @app.exception_handler(_ClientGone)
    async def _gone(request, e):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", "server_error", None, "internal_error"), status_code=500)

    async def _respond(request: Request, prep: handlers.Prepared) -> Response:
        job = handlers.submit(prep, engine)
        if prep.req.stream:
            return EventStreamResponse(handlers.sse(prep, job), job.cancel)
        return JSONResponse(await _until_disconnect(handlers.collect(prep, job), request.receive, job.cancel))

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                           "Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        body = {"status": "draining" if engine.draining else "ok", **engine.stats()}
        return JSONResponse(body, status_code=503 if engine.draining else 200)

    @app.get("/v1/models")
    async def list_models():
        return handlers.models_list(model_name, created, engine)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"The model {model_id!r} does not exist", "invalid_request_error", "model",
                           "model_not_found")
        return handlers.models_list(model_name, created, engine)["data"][0]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = handlers.parse_json_body(await read_body(request, limits), limits)
        return await _respond(request, await handlers.prepare_chat(body, engine, limits, model_name))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = handlers.parse_json_body(await read_body(request, limits), limits)
        return await _respond(request, await handlers.prepare_completion(body, engine, limits, model_name))

    return app
