"""The OpenAI-compatible HTTP API: `create_app(async_engine, config, session_store=None) -> FastAPI`.

Endpoints: GET /v1/models (and /v1/models/{id}), POST /v1/completions, POST /v1/chat/completions
(JSON or SSE streaming), the Responses API (POST /v1/responses, GET / DELETE /v1/responses/{id}, GET
/v1/responses/{id}/input_items, POST /v1/responses/{id}/cancel: responses.py; POST /v1/responses/input_tokens:
responses_input_tokens.py), the Conversations API
(/v1/conversations: conversations.py), Anthropic's Messages API (POST /v1/messages and
/v1/messages/count_tokens: adapters/anthropic/), GET /health, GET /metrics (Prometheus text). `agentserve serve
--http-port` runs this app under uvicorn in the same event loop as the gRPC server, over the same AsyncEngine.

Errors come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (on /v1/messages in
Anthropic's, `{"type": "error", "error": {"type", "message"}}`, with the same statuses): 400 for invalid
fields (the field named in `param`), 401 without the right `Authorization: Bearer <key>` (or `X-Api-Key`) when
API keys are configured (on /v1/*; /health and /metrics stay open, as in vLLM), 404 for an unknown model,
413 for a request body over `max_body_bytes`, 400 (`context_length_exceeded`) for a prompt that does
not fit, 429 when the key's tenant has `max_requests_per_tenant` requests in flight, 503 when the
engine's queue is full.

Tenants (service/tenants.py): the key's tenant goes into the request scope (`scope["state"][TENANT_SCOPE_KEY]`),
and the serving code hashes the request's KV pages under the tenant's cache salt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

import agentserve
from agentserve.adapters.anthropic.models import ANTHROPIC_VERSION_HEADER, anthropic_model, anthropic_model_page
from agentserve.adapters.anthropic.protocol import MESSAGES_PATH, error_body as anthropic_error_body
from agentserve.adapters.anthropic.routes import add_anthropic_routes
from agentserve.adapters.openai.metrics import Metrics
from agentserve.adapters.openai.tokenize_routes import add_tokenize_routes
from agentserve.adapters.openai.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, error_body
from agentserve.adapters.openai.chat import ChatEndpoint
from agentserve.adapters.openai.completions import CompletionsEndpoint
from agentserve.adapters.openai.invocations import INVOCATIONS_PATH, add_invocations_route
from agentserve.adapters.openai.responses import ResponsesEndpoint
from agentserve.adapters.openai.responses_routes import add_responses_routes, respond
from agentserve.adapters.openai.request_ids import RequestIdHeaderMiddleware
from agentserve.adapters.openai.route_path import anthropic_shaped, route_path
from agentserve.adapters.openai.serving import OpenAIServing
from agentserve.adapters.openai.lora_routes import add_lora_routes, install_lora_error_handlers
from agentserve.chat.render_pool import RenderPool
from agentserve.errors import FieldError
from agentserve.service.tenants import SLOT_SCOPE_KEY, TENANT_SCOPE_KEY, HeldRequestSlot, Tenant, TenantLimitError, Tenants

logger = logging.getLogger(__name__)

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/conversations", MESSAGES_PATH,
              INVOCATIONS_PATH, "/v1/models", "/health", "/metrics")
# These take one of the tenant's request slots.
_GENERATION_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", MESSAGES_PATH, INVOCATIONS_PATH)


class _ErrorJSONResponse(JSONResponse):
    """An error's JSON. Messages may quote the request's own strings, and JSON can spell a lone surrogate
    ("\\ud800") that UTF-8 cannot encode: such a body is written with escapes rather than failing the
    error itself (the input checks refuse those strings by name; this is for any message they miss)."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error_response(status: int, message: str, type: str, param: Optional[str] = None, code: Optional[str] = None,
                    headers: Optional[dict[str, str]] = None, anthropic: bool = False) -> JSONResponse:
    """An error in OpenAI's shape, or in Anthropic's (`anthropic`: route_path.anthropic_shaped)."""
    body = anthropic_error_body(status, message) if anthropic else error_body(message, type, param, code)
    return _ErrorJSONResponse(body, status_code=status, headers=headers)


def _openai_error_response(e: OpenAIError, anthropic: bool) -> JSONResponse:
    return _error_response(e.status, e.message, e.type, e.param, e.code,
                           {"Retry-After": "1"} if e.status == 503 else None, anthropic)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from the body's receive channel; an HTTPException so that FastAPI's body reading passes
    it through to the error handlers (413) instead of answering 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is over the limit of {limit} bytes (--max-body-bytes).")


class _GateMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: it would break streaming and disconnect detection):
    the header count (--h11-max-header-count), API key on /v1/* (its tenant put into the scope), the
    tenant's limit of requests in flight (held until the response, streamed or not, is over), request
    body size limit, and per-endpoint request/status counters.

    The body limit holds on the bytes actually read, whatever the headers say (a chunked body has no
    Content-Length): the receive channel counts them and fails the read as soon as the limit is
    passed, so the rest is never buffered (uvicorn stops reading the socket meanwhile)."""

    def __init__(self, app: Any, tenants: Tenants, metrics: Metrics, max_body_bytes: int, max_header_count: int) -> None:
        self.app = app
        self.tenants = tenants
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_header_count = max_header_count

    def _limited(self, receive: Any) -> Any:
        read = 0

        async def limited_receive() -> Any:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_body_bytes:
                    raise _BodyTooLarge(self.max_body_bytes)
            return message

        return limited_receive

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, anthropic = route_path(scope), anthropic_shaped(scope)
        endpoint = next((e for e in _ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        status_box = [500]

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            raw_headers = scope.get("headers") or []
            if len(raw_headers) > self.max_header_count:
                resp = _error_response(431, f"The request carries {len(raw_headers)} headers; the limit is "
                                            f"{self.max_header_count} (--h11-max-header-count).",
                                       "invalid_request_error", None, "request_header_fields_too_large",
                                       anthropic=anthropic)
                await resp(scope, receive, counting_send)
                return
            headers = dict(raw_headers)
            tenant = self.tenants.authenticate(None)  # the anonymous tenant, or None when keys are required
            if self.tenants.requires_key and (path.startswith("/v1") or path == INVOCATIONS_PATH):
                auth = headers.get(b"authorization", b"")
                if not auth and b"x-api-key" in headers:  # Anthropic's clients send their key so
                    auth = b"Bearer " + headers[b"x-api-key"]
                scheme, _, token = auth.partition(b" ")
                if not auth:
                    resp = _error_response(
                        401, "You didn't provide an API key. Provide it in the Authorization header using "
                             "Bearer auth (Authorization: Bearer YOUR_KEY), or in X-Api-Key.",
                        "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"}, anthropic)
                    await resp(scope, receive, counting_send)
                    return
                tenant = None
                if scheme.lower() == b"bearer":
                    tenant = self.tenants.authenticate(token.strip().decode("utf-8", "replace"))
                if tenant is None:
                    resp = _error_response(401, "Incorrect API key provided.", "invalid_request_error", None,
                                           "invalid_api_key", {"WWW-Authenticate": "Bearer"}, anthropic)
                    await resp(scope, receive, counting_send)
                    return
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    too_big = int(length) > self.max_body_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    resp = _error_response(413, f"The request body is {int(length)} bytes; the limit is "
                                                f"{self.max_body_bytes} bytes (--max-body-bytes).",
                                           "invalid_request_error", None, "request_too_large", anthropic=anthropic)
                    await resp(scope, receive, counting_send)
                    return
            limited = self._limited(receive)
            if tenant is not None:
                scope.setdefault("state", {})[TENANT_SCOPE_KEY] = tenant
            if tenant is None or scope.get("method") != "POST" or path not in _GENERATION_ENDPOINTS:
                await self.app(scope, limited, counting_send)
                return
            await self._generation(scope, limited, counting_send, tenant, anthropic)
        finally:
            self.metrics.http_requests.labels(endpoint, str(status_box[0])).inc()

    async def _generation(self, scope: Any, receive: Any, send: Any, tenant: Tenant, anthropic: bool) -> None:
        """A generation request, in one of the tenant's request slots (429 when none is left)."""
        try:
            self.tenants.acquire(tenant)
        except TenantLimitError as e:
            resp = _error_response(429, str(e), "rate_limit_error", None, "rate_limit_exceeded",
                                   {"Retry-After": "1"}, anthropic)
            await resp(scope, receive, send)
            return
        slot = scope["state"][SLOT_SCOPE_KEY] = HeldRequestSlot(self.tenants, tenant)

        async def send_then_free(message: Any) -> None:
            # Free before the last body chunk leaves: a client that has its whole reply and sends the next
            # request at once must find the slot free (freed after the send, a sequential client got 429s).
            if message["type"] == "http.response.body" and not message.get("more_body") and not slot.kept:
                slot.release()
            await send(message)

        try:
            await self.app(scope, receive, send_then_free)
        finally:
            if not slot.kept:  # a background response keeps it until its turn ends
                slot.release()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return _openai_error_response(exc, anthropic_shaped(request.scope))

    @app.exception_handler(FieldError)
    async def _field_error(request: Request, exc: FieldError) -> JSONResponse:
        return _error_response(400, str(exc), "invalid_request_error", exc.field, exc.code,
                               anthropic=anthropic_shaped(request.scope))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error_response(exc, request.headers.get("content-type", ""), anthropic_shaped(request.scope))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "request_too_large" if exc.status_code == 413 else None
        return _error_response(exc.status_code, str(exc.detail), type_, None, code,
                               dict(exc.headers) if exc.headers else None, anthropic_shaped(request.scope))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", route_path(request.scope))
        return _error_response(500, f"internal server error: {type(exc).__name__}: {exc}", "server_error",
                               anthropic=anthropic_shaped(request.scope))


def _validation_error_response(exc: RequestValidationError, content_type: str, anthropic: bool) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("loc") == ("body",):  # the body as a whole: empty, not JSON, or not an object
        return _error_response(400, _body_problem(first, content_type), "invalid_request_error", None, anthropic=anthropic)
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Unions report the branch tried ("prompt.str"): keep the field path readable.
    loc = [p for p in loc if p not in ("str", "int", "float", "bool", "list[str]", "list[int]",
                                       "list[list[int]]", "dict[str,any]")]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        message = f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        param = None
    elif first.get("type") == "missing":
        message = f"'{param}' is a required property"
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg"))
        if first.get("input") is not None and first.get("type") != "model_attributes_type":
            with contextlib.suppress(TypeError, ValueError):
                message += f" (got {json.dumps(first['input'])[:200]})"
    return _error_response(400, message, "invalid_request_error", param, anthropic=anthropic)


def _body_problem(error: dict[str, Any], content_type: str) -> str:
    """What is wrong with a request body that is no JSON object, in words a client can act on."""
    if error.get("type") == "missing":
        return "The request body is empty: send the request as a JSON object"
    if not content_type:
        return ("The request body must be a JSON object sent with Content-Type: application/json (the request has "
                "no Content-Type header)")
    if "json" not in content_type.split(";", 1)[0]:
        return (f"The request body must be a JSON object sent with Content-Type: application/json "
                f"(got Content-Type: {content_type[:100]})")
    got = type(error.get("input")).__name__
    kind = {"list": "array", "str": "string", "NoneType": "null", "dict": "object"}.get(got, got)
    return f"The request body must be a JSON object, got a JSON {kind}"


def _add_status_routes(app: FastAPI, async_engine: Any, metrics: Metrics) -> None:
    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_running():
            return _error_response(503, "the engine is not running", "server_error", None, "engine_unavailable")
        return Response(status_code=200)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:  # vLLM's (SageMaker's) liveness route: /health's answer
        return await health()

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": agentserve.__version__})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_model_routes(app: FastAPI, serving: OpenAIServing) -> None:
    # Anthropic's clients (the anthropic-version header) get Anthropic's shapes of the same models.
    @app.get("/v1/models")
    async def list_models(raw_request: Request) -> JSONResponse:
        models = serving.list_models()
        anthropic = ANTHROPIC_VERSION_HEADER in raw_request.headers
        return JSONResponse(anthropic_model_page(models) if anthropic else models)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, raw_request: Request) -> JSONResponse:
        card = serving.get_model(model_id)
        return JSONResponse(anthropic_model(card) if ANTHROPIC_VERSION_HEADER in raw_request.headers else card)


def _add_generation_routes(app: FastAPI, serving: OpenAIServing) -> None:
    completions_endpoint = CompletionsEndpoint(serving)
    chat_endpoint = ChatEndpoint(serving)
    add_tokenize_routes(app, serving, chat_endpoint)  # /tokenize renders messages as chat completions do

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw_request: Request) -> Response:
        return await respond(completions_endpoint.create(body, raw_request))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request) -> Response:
        return await respond(chat_endpoint.create(body, raw_request))

    add_anthropic_routes(app, chat_endpoint)  # /v1/messages: Anthropic's API over the same chat completions
    add_invocations_route(app, chat_endpoint, completions_endpoint)  # SageMaker's /invocations


def _lifespan(metrics: Metrics, own_pool: Optional[RenderPool],
              responses: ResponsesEndpoint) -> Callable[[FastAPI], Any]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def drain() -> None:
            while True:
                await asyncio.sleep(1.0)
                metrics.drain()

        task = asyncio.create_task(drain())
        try:
            yield
        finally:
            task.cancel()
            await responses.close()
            metrics.uninstall()
            if own_pool is not None:
                own_pool.close()

    return lifespan


def create_app(async_engine: Any, config: Any, session_store: Any = None, *, max_body_bytes: Optional[int] = None,
               render_pool: Optional[RenderPool] = None, tenants: Optional[Tenants] = None) -> FastAPI:
    """The FastAPI app over `async_engine` (an AsyncEngine). `config` is the EngineConfig (for the API
    keys, the request limits and the model path); `session_store` (optional) feeds the session gauges
    of /metrics. `render_pool` is the render/tokenize pool shared with the gRPC service (the app makes,
    and closes, its own without one); `max_body_bytes` overrides `config.server.max_body_bytes`;
    `tenants` (shared with the gRPC server) defaults to the tenants of `config.server`."""
    metrics = Metrics(async_engine.engine, session_store)
    metrics.install()
    own_pool = None
    if render_pool is None:
        render_pool = own_pool = RenderPool(async_engine.engine.tokenizer, async_engine.engine.max_model_len,
                                            config.server)
    serving = OpenAIServing(async_engine, config, metrics, render_pool)
    responses = ResponsesEndpoint(serving, session_store)
    app = FastAPI(title="agentserve OpenAI-compatible API", lifespan=_lifespan(metrics, own_pool, responses),
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving
    app.state.metrics = metrics
    app.state.async_engine = async_engine
    app.state.session_store = session_store
    _install_error_handlers(app)
    _add_status_routes(app, async_engine, metrics)
    _add_model_routes(app, serving)
    _add_generation_routes(app, serving)
    install_lora_error_handlers(app)
    add_lora_routes(app, async_engine)
    add_responses_routes(app, responses)
    app.add_middleware(_GateMiddleware, tenants=tenants or Tenants.from_config(config.server), metrics=metrics,
                       max_body_bytes=config.server.max_body_bytes if max_body_bytes is None else max_body_bytes,
                       max_header_count=config.server.h11_max_header_count)
    if config.server.enable_request_id_headers:  # outside the gate: its 401 / 413 / 429 answers carry it too
        app.add_middleware(RequestIdHeaderMiddleware)
    # Outermost, as in vLLM: a browser's preflight (OPTIONS, no API key) is answered here, before the key
    # check, and the gate's 401 / 429 answers carry the CORS headers the page needs to read them.
    app.add_middleware(CORSMiddleware, allow_origins=config.server.allowed_origins,
                       allow_methods=config.server.allowed_methods, allow_headers=config.server.allowed_headers,
                       allow_credentials=config.server.allow_credentials)
    return app


__all__ = ["create_app"]
