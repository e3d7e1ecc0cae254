"""The team stack's S3 store on 127.0.0.1: moto's S3 API server standing in for S3 or MinIO.

MLflow's artifacts (`s3://<bucket>/mlflow`) and the DVC remote (`s3://<bucket>/dvc`) live there. Clients find
it through AWS_ENDPOINT_URL_S3 (boto3, s3fs: DVC) and MLFLOW_S3_ENDPOINT_URL (MLflow); unset both and the same
URLs name a real bucket, with the credentials of the environment.

moto keeps objects in memory. So that `make down` keeps the data, moto's recorder appends every request to
`.run/s3/recording.jsonl` and `make up` replays the file into the new server before anything else uses it.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "ottimo-local", "AWS_SECRET_ACCESS_KEY": "ottimo-local"}  # moto checks none
REGION = "us-east-1"


def recording(run_dir: Path) -> Path:
    return run_dir / "s3" / "recording.jsonl"


def endpoint(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def argv(host: str, port: int) -> list[str]:
    return [str(Path(sys.executable).parent / "moto_server"), "-H", host, "-p", str(port)]


def server_env(run_dir: Path) -> dict[str, str]:
    """moto's own settings: record every request to the recording file."""
    recording(run_dir).parent.mkdir(parents=True, exist_ok=True)
    return {"MOTO_ENABLE_RECORDING": "true", "MOTO_RECORDER_FILEPATH": str(recording(run_dir))}


def client_env(url: str, env: dict[str, str]) -> dict[str, str]:
    """What the stack's processes need to reach the store at `url`: endpoint, region, and the environment's own
    AWS credentials or, when it has none, placeholder ones (moto accepts any)."""
    creds = {k: env[k] for k in LOCAL_CREDENTIALS if env.get(k)} or LOCAL_CREDENTIALS
    return {**creds, "AWS_DEFAULT_REGION": env.get("AWS_DEFAULT_REGION") or REGION,
            "AWS_ENDPOINT_URL_S3": url, "MLFLOW_S3_ENDPOINT_URL": url}


def restore(url: str, run_dir: Path) -> int:
    """Replay what the recording holds into a fresh server (the requests of earlier `up`s); return their number."""
    path = recording(run_dir)
    if not path.is_file() or not path.stat().st_size:
        return 0
    with path.open("rb") as f:
        n = sum(1 for _ in f)
    req = urllib.request.Request(f"{url}/moto-api/recorder/replay-recording", data=b"", method="POST")
    urllib.request.urlopen(req, timeout=600).close()
    return n


def ensure_bucket(url: str, bucket: str, env: dict[str, str]) -> bool:
    """Create the bucket when it is not there; True when it was created."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=url, region_name=env.get("AWS_DEFAULT_REGION") or REGION,
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    if any(b["Name"] == bucket for b in s3.list_buckets().get("Buckets", [])):
        return False
    s3.create_bucket(Bucket=bucket)
    return True
