"""A small stdlib client of the endpoint (one keep-alive connection per client), and a load that keeps
`clients` of them busy: what the tests and bench/serve.py drive the server with. Loopback only."""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field

LOOPBACK = ("127.0.0.1", "localhost")


class Client:
    def __init__(self, host: str, port: int, token: str | None = None, timeout: float = 30) -> None:
        if host not in LOOPBACK:
            raise ValueError(f"{host}: this client talks to 127.0.0.1 / localhost only")
        self.host, self.port, self.timeout = host, port, timeout
        self.headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
        self._conn: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, body: bytes | dict | None = None,
             headers: dict | None = None) -> tuple[int, dict]:
        """(status, JSON answer); reconnects once when the kept-alive connection was closed by the server."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=data, headers=self.headers | (headers or {}))
                resp = self._conn.getresponse()
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else {}
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def predict(self, rows: list) -> tuple[int, dict]:
        return self.call("POST", "/predict", {"rows": rows})

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@dataclass
class Answer:
    t: float  # time.monotonic() when the answer came
    ms: float  # latency
    status: int
    version: str | None


@dataclass
class Load:
    """`clients` threads posting `rows` as fast as they are answered, until stop() or `max_requests` each."""

    host: str
    port: int
    rows: list
    clients: int = 1
    token: str | None = None
    max_requests: int = 1_000_000
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(self.clients)]

    def _work(self) -> None:
        client = Client(self.host, self.port, self.token)
        try:
            for _ in range(self.max_requests):
                if self._stop.is_set():
                    break
                t0 = time.perf_counter()
                try:
                    status, body = client.predict(self.rows)
                except OSError as err:
                    self.errors.append(f"{type(err).__name__}: {err}")
                    status, body = 0, {}
                ms = (time.perf_counter() - t0) * 1e3
                self.answers.append(Answer(time.monotonic(), ms, status, body.get("version")))
        finally:
            client.close()

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> Load:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        return self

    def run_for(self, seconds: float) -> Load:
        self.start()
        self._stop.wait(seconds)
        return self.stop()
