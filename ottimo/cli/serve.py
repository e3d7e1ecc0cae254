"""`ottimo serve`: the online endpoint that answers with the champion and follows the alias (ottimo.serving)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ottimo.cli.common import PARAMS, PROJECT, params_or_exit, say

PORT_ENV = "OTTIMO_SERVE_PORT"


def serve(port: int = typer.Option(None, "--port", help="Port on deploy.host (default: deploy.serve.port, "
                                   f"or ${PORT_ENV})."),
          project_dir: Path = PROJECT, params_file: str = PARAMS) -> None:
    """Serve the champion's ONNX file (sha256-verified) on POST /predict at 127.0.0.1; swap to the new version
    when the alias moves (poll every deploy.serve.poll_seconds, SIGHUP or POST /reload), log the served rows as
    monitoring batches for the drift check. Stops on Ctrl-C / SIGTERM after the requests in flight."""
    root = project_dir.resolve()
    params = params_or_exit(root, params_file)
    cfg = params.deploy
    port = port or int(os.environ.get(PORT_ENV) or cfg.serve.port)
    from ottimo.serving.app import serve as run

    say(f"ottimo serve: http://{cfg.host}:{port} (POST /predict, GET /model, GET /health), "
        f"following {params.mlflow.registered_model}@{cfg.serve.alias}")
    run(root, params, cfg.host, port)
