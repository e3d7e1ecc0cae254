"""The HTTP endpoint (Starlette on uvicorn, 127.0.0.1 only): POST /predict, POST /labels, GET /health, GET /model,
POST /reload, POST /traffic/flush.

Every answer is JSON; a bad request gets a 4xx whose "error" says what to change, and changes nothing. A predict
takes the served version once, at its start (`follower.current`), so it finishes on that version even when a
swap happens meanwhile. Authentication is off unless the variable named by deploy.serve.token_env is set; then
every endpoint but /health needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path

import anyio
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ottimo.config import Params
from ottimo.serving import requests as rq
from ottimo.serving.model import Follower
from ottimo.serving.traffic import TooLate, TrafficLog, UnknownId

log = logging.getLogger("ottimo.serve")
OPEN = {"/health"}  # answered without the token (a liveness probe)
INLINE_ROWS = 16


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit` bytes: by Content-Length, else while it streams."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise rq.BadRequest(413, f"body of {int(declared):,} bytes is above deploy.serve.max_body_bytes = "
                                 f"{limit:,}; send fewer rows per request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise rq.BadRequest(413, f"body is above deploy.serve.max_body_bytes = {limit:,} bytes; send fewer "
                                     "rows per request")
        chunks.append(chunk)
    return b"".join(chunks)


class TokenGuard:
    """ASGI middleware: with a token set, every HTTP request but OPEN paths needs `Authorization: Bearer <token>`."""

    def __init__(self, app, token: str | None, env_name: str) -> None:
        self.app, self.token, self.env_name = app, token, env_name

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.token and scope["path"] not in OPEN:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not rq.authorized(header, self.token):
                response = JSONResponse({"error": f"missing or wrong bearer token (the server reads it from "
                                                  f"${self.env_name}); send Authorization: Bearer <token>",
                                         "status": 401}, 401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Endpoint:
    """The routes, over one Follower (the model) and one TrafficLog (what was served)."""

    def __init__(self, root: Path, params: Params, follower: Follower, traffic: TrafficLog) -> None:
        self.params, self.follower, self.traffic = params, follower, traffic
        cfg = params.deploy.serve
        self.limits = rq.Limits(cfg.max_rows, cfg.max_body_bytes, params.limits.max_abs_value)
        self.token = os.environ.get(cfg.token_env) or None
        self.served = self.refused_requests = 0

    def app(self) -> Starlette:
        routes = [Route("/predict", self.predict, methods=["POST"]), Route("/labels", self.labels, methods=["POST"]),
                  Route("/health", self.health, methods=["GET"]), Route("/model", self.model, methods=["GET"]),
                  Route("/reload", self.reload, methods=["POST"]),
                  Route("/traffic/flush", self.flush, methods=["POST"])]
        handlers = {rq.BadRequest: self._refused, HTTPException: self._http_error, Exception: self._crash}
        app = Starlette(routes=routes, lifespan=self.lifespan, exception_handlers=handlers)
        return TokenGuard(app, self.token, self.params.deploy.serve.token_env)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        stop = threading.Event()
        self.traffic.start()
        await anyio.to_thread.run_sync(self.follower.check)
        poller = threading.Thread(target=self.follower.follow, args=(stop,), name="alias-poller", daemon=True)
        poller.start()
        log.info("following %s@%s every %g s; POST /predict on this address%s", self.follower.name,
                 self.follower.alias, self.params.deploy.serve.poll_seconds,
                 "; bearer token required" if self.token else "")
        yield
        stop.set()
        self.follower.wake()
        poller.join(timeout=30)
        await anyio.to_thread.run_sync(self.traffic.stop)

    async def _refused(self, request: Request, err: rq.BadRequest) -> JSONResponse:
        self.refused_requests += 1
        log.info("%s %s refused (%d): %s", request.method, request.url.path, err.status, err)
        return error(err.status, str(err))

    async def _http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        hint = {404: f"no such endpoint {request.url.path}; see GET /model, POST /predict",
                405: f"{request.method} is not allowed on {request.url.path}"}
        return error(exc.status_code, hint.get(exc.status_code, str(exc.detail)))

    async def _crash(self, request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the server keeps serving, see its log")

    async def predict(self, request: Request) -> JSONResponse:
        served = self.follower.current  # the version this request runs on, start to end
        body = await read_body(request, self.limits.max_body_bytes)
        if served is None:
            return error(503, self._nothing_served())
        X = rq.parse_predict(body, served.features, self.limits, served.spec)
        # a small batch runs on the event loop (a thread hop costs more than the model); a big one off it
        logits = served.logits(X) if len(X) <= INLINE_ROWS else await anyio.to_thread.run_sync(served.logits, X)
        probs = rq.softmax(logits.astype(np.float64))
        labels = np.asarray(served.labels)[probs.argmax(axis=1)].tolist()
        rid = self.traffic.append(served.version, served.features, X, labels)
        self.served += 1
        return JSONResponse({"id": rid, "model": served.name, "version": served.version, "classes": served.labels,
                             "labels": labels, "probabilities": np.round(probs, 6).tolist()})

    async def labels(self, request: Request) -> JSONResponse:
        served = self.follower.current
        if served is None:
            return error(503, self._nothing_served())
        rid, labels = rq.parse_labels(await read_body(request, self.limits.max_body_bytes), served.labels,
                                      self.limits)
        try:
            result = await anyio.to_thread.run_sync(self.traffic.label, rid, labels)
        except UnknownId as err:
            raise rq.BadRequest(404, str(err)) from None
        except TooLate as err:
            raise rq.BadRequest(409, str(err)) from None
        except ValueError as err:
            raise rq.BadRequest(422, str(err)) from None
        return JSONResponse({"id": rid, "labels": len(labels), "result": result}, status_code=202)

    async def health(self, request: Request) -> JSONResponse:
        served = self.follower.current
        body = {"status": "ok" if served else "no model", "version": served.version if served else None,
                "requests": self.served, "refused_requests": self.refused_requests, "traffic": self.traffic.state()}
        return JSONResponse(body, status_code=200 if served else 503)

    async def model(self, request: Request) -> JSONResponse:
        return JSONResponse(self.follower.state())

    async def reload(self, request: Request) -> JSONResponse:
        """Check the registry now (a refused version is tried again), and say what serves after it."""
        action = await anyio.to_thread.run_sync(lambda: self.follower.check(force=True))
        return JSONResponse({"action": action, **self.follower.state()})

    async def flush(self, request: Request) -> JSONResponse:
        """Close the open traffic segment now: its rows are in the next drift window when this answers."""
        await anyio.to_thread.run_sync(self.traffic.flush)
        return JSONResponse(self.traffic.state())

    def _nothing_served(self) -> str:
        f = self.follower
        why = f"v{f.refused.version} was refused: {f.refused.reason}" if f.refused else (
            f.error or f"{f.name} has no {f.alias!r} version yet: run `ottimo run`")
        return f"no model is served yet ({why}); the server checks again every {f.params.deploy.serve.poll_seconds:g} s"


def serve(root: Path, params: Params, host: str, port: int) -> None:
    """Run the endpoint in the foreground until SIGINT / SIGTERM (requests in flight finish); SIGHUP checks the
    registry at once."""
    follower = Follower(root, params)
    endpoint = Endpoint(root, params, follower, TrafficLog(root, params))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGHUP, lambda *_: follower.wake())
    config = uvicorn.Config(endpoint.app(), host=host, port=port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=30, log_config=None)
    uvicorn.Server(config).run()
