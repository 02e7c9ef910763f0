"""The `uploadsvc` command as a user runs it: the installed console script in a subprocess,
against the real web server, real push workers and the real Incus; what lands is checked
inside the instance with the incus CLI."""

import fcntl
import hashlib
import json
import os
import pty
import re
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from rest_framework.authtoken.models import Token

from tests.conftest import ROOT, Server, subprocess_env
from tests.incus_utils import IMAGE, RUNNING, incus, run_in, sha256_in, stat_in, unique_dir
from uploads.cli.sources import Target, UsageError, parse_target
from uploads.models import AuditEvent, Status, UploadTask

UPLOADSVC = str(Path(sys.executable).parent / "uploadsvc")


def uploadsvc(
    *args: str, url: str, token: str, stdin: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UPLOADSVC_URL": url, "UPLOADSVC_TOKEN": token}
    result = subprocess.run(
        [UPLOADSVC, *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


class Service:
    """The web server, a token for alice, and push workers started on demand."""

    def __init__(self, server: Server, token: str, incus: str, log: Path) -> None:
        self.server = server
        self.url = server.url
        self.token = token
        self.incus = incus
        self.log = log
        self.workers: list[subprocess.Popen[bytes]] = []

    def run(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("url", self.url)
        return uploadsvc(*args, token=self.token, **kwargs)

    def start_workers(self) -> None:
        self.workers.append(
            subprocess.Popen(
                [sys.executable, "manage.py", "run_push_workers", "--threads", "2"],
                cwd=ROOT,
                env=subprocess_env(self.server.spool, UPLOADS_INCUS_ENDPOINT=self.incus),
                stdout=open(self.log, "ab"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
        )

    def stop_workers(self) -> None:
        for proc in self.workers:
            proc.terminate()
        for proc in self.workers:
            proc.wait(timeout=60)


@pytest.fixture
def service(web_server: Server, user: User, incus: str, tmp_path: Path) -> Iterator[Service]:
    token = Token.objects.create(user=user).key
    svc = Service(web_server, token, incus, tmp_path / "workers.log")
    try:
        yield svc
    finally:
        svc.stop_workers()


@pytest.fixture
def delivering(service: Service) -> Service:
    """The service with its push workers running."""
    service.start_workers()
    return service


@pytest.fixture
def workdir() -> Iterator[str]:
    """A fresh directory path inside the running test instance (not created), removed after."""
    path = unique_dir()
    yield path
    run_in(RUNNING, "rm", "-rf", path)


LINE = re.compile(r"^([0-9a-f-]{36})  (.+)  (\w+)$")


def lines(stdout: str) -> list[tuple[str, str, str]]:
    """The (id, destination, status) lines a push prints."""
    parsed = []
    for text in stdout.splitlines():
        match = LINE.match(text)
        assert match, f"unexpected output line {text!r}"
        parsed.append((match[1], match[2], match[3]))
    return parsed


@pytest.mark.incus
def test_push_wait_lands_with_content_mode_and_owner(
    delivering: Service, workdir: str, tmp_path: Path
) -> None:
    body = os.urandom(300_000)
    local = tmp_path / "app.bin"
    local.write_bytes(body)
    dest = f"{workdir}/app.bin"
    result = delivering.run(
        "push",
        "--wait",
        "-p",
        "--mode",
        "0640",
        "--uid",
        "1000",
        "--gid",
        "1000",
        str(local),
        f"{RUNNING}{dest}",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress line when standard error is not a terminal
    [(task_id, where, status)] = lines(result.stdout)
    assert (where, status) == (f"{RUNNING}{dest}", "succeeded")
    task = UploadTask.objects.get(pk=task_id)
    assert task.sha256 == hashlib.sha256(body).hexdigest()
    assert sha256_in(RUNNING, dest) == hashlib.sha256(body).hexdigest()
    assert stat_in(RUNNING, dest) == ("640", 1000, 1000, len(body))


@pytest.mark.incus
def test_failing_push_exits_1_with_the_instance_path_and_reason(
    delivering: Service, tmp_path: Path
) -> None:
    """The CI one-liner of the README: a push to an instance that does not exist."""
    local = tmp_path / "app.conf"
    local.write_text("x = 1\n")
    missing = f"uploadsvc-nothere-{uuid.uuid4().hex[:8]}"
    result = delivering.run("push", "--wait", str(local), f"{missing}/etc/app.conf")
    assert result.returncode == 1
    [(_, where, status)] = lines(result.stdout)
    assert (where, status) == (f"{missing}/etc/app.conf", "failed")
    assert result.stderr == (
        f"uploadsvc: push to {missing}/etc/app.conf failed: "
        f"instance '{missing}' not found in project 'default'\n"
    )


@pytest.mark.incus
def test_refused_push_exits_1_with_the_servers_message_and_queues_nothing(
    service: Service, django_user_model: Any, tmp_path: Path
) -> None:
    carol = django_user_model.objects.create_user(username="carol", password="pw-carol-123")
    token = Token.objects.create(user=carol).key  # carol has no grant
    local = tmp_path / "a.txt"
    local.write_text("a\n")
    result = uploadsvc(
        "push", "--wait", str(local), f"{RUNNING}/tmp/a.txt", url=service.url, token=token
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"uploadsvc: cannot push {local} to {RUNNING}/tmp/a.txt: 403 Forbidden: "
    )
    assert not UploadTask.objects.exists()

    bad = uploadsvc("ls", url=service.url, token="not-a-token")
    assert bad.returncode == 1
    assert bad.stderr == (
        "uploadsvc: 401 Unauthorized: Invalid token. (set UPLOADSVC_TOKEN or --token)\n"
    )


@pytest.mark.incus
def test_one_file_to_a_glob_and_to_several_targets_is_sent_once_each_time(
    delivering: Service, tmp_path: Path
) -> None:
    prefix = f"uploadsvc-clifan{uuid.uuid4().hex[:6]}"
    names = [f"{prefix}-{n}" for n in range(3)]
    for name in names:
        incus("init", IMAGE, name)
    try:
        body = os.urandom(150_000)
        local = tmp_path / "app.bin"
        local.write_bytes(body)
        result = delivering.run("push", "--wait", "-p", str(local), f"{prefix}-*/srv/app.bin")
        assert result.returncode == 0, result.stderr
        assert [(where, status) for _, where, status in lines(result.stdout)] == [
            (f"{name}/srv/app.bin", "succeeded") for name in names
        ]
        # -t targets must name one path; there a file stands where a directory must be.
        run = delivering.run(
            "push",
            "--wait",
            str(local),
            "-t",
            f"{names[0]}/srv/again.bin",
            "-t",
            f"{names[1]}/srv/again.bin",
            "-t",
            f"{names[2]}/srv/app.bin/again.bin",
        )
        assert run.returncode == 2  # not the same path: a usage error, nothing sent
        run = delivering.run(
            "push",
            "--wait",
            str(local),
            "-t",
            f"{names[0]}/srv/app.bin/x",
            "-t",
            f"{names[1]}/srv/app.bin/x",
        )
        assert run.returncode == 1
        assert [status for _, _, status in lines(run.stdout)] == ["failed", "failed"]
        assert run.stderr == "".join(
            f"uploadsvc: push to {name}/srv/app.bin/x failed: /srv/app.bin is not a directory "
            f"in {name}\n"
            for name in names[:2]
        )
        batches = {task.batch_id for task in UploadTask.objects.all()}
        assert len(batches) == 2 and None not in batches  # one upload each time
        for name in names:
            assert sha256_in(name, "/srv/app.bin") == hashlib.sha256(body).hexdigest()
    finally:
        for name in names:
            incus("delete", "--force", name, check=False)


@pytest.mark.incus
def test_several_sources_go_into_a_directory_each_with_its_name_and_local_mode(
    delivering: Service, workdir: str, tmp_path: Path
) -> None:
    script = tmp_path / "deploy.sh"
    script.write_text("#!/bin/sh\necho deployed\n")
    script.chmod(0o755)
    secret = tmp_path / "secret.env"
    secret.write_text("TOKEN=abc\n")
    secret.chmod(0o600)
    result = delivering.run("push", "--wait", "-p", str(script), str(secret), f"{RUNNING}{workdir}")
    assert result.returncode == 0, result.stderr
    assert [(w, s) for _, w, s in lines(result.stdout)] == [
        (f"{RUNNING}{workdir}/deploy.sh", "succeeded"),
        (f"{RUNNING}{workdir}/secret.env", "succeeded"),
    ]
    # Like `incus file push`: the local permission bits travel, the owner does not.
    assert stat_in(RUNNING, f"{workdir}/deploy.sh")[:3] == ("755", 0, 0)
    assert stat_in(RUNNING, f"{workdir}/secret.env")[:3] == ("600", 0, 0)
    assert run_in(RUNNING, f"{workdir}/deploy.sh") == "deployed\n"


@pytest.mark.incus
def test_recursive_push_of_a_small_tree_refusing_symlinks(
    delivering: Service, workdir: str, tmp_path: Path
) -> None:
    tree = tmp_path / "site"
    (tree / "css").mkdir(parents=True)
    (tree / "index.html").write_text("<h1>hi</h1>\n")
    (tree / "css" / "main.css").write_text("h1 { color: red }\n")
    (tree / "css" / "empty.css").write_bytes(b"")
    (tree / "latest").symlink_to("index.html")

    refused = delivering.run("push", "-r", "-p", "--wait", str(tree), f"{RUNNING}{workdir}/")
    assert refused.returncode == 1
    assert refused.stderr == (
        f"uploadsvc: {tree}/latest is a symbolic link; uploadsvc pushes regular files only "
        "(replace the link by its target or leave it out of the tree)\n"
    )
    assert not UploadTask.objects.exists()  # checked before anything was sent

    (tree / "latest").unlink()
    result = delivering.run("push", "-r", "-p", "--wait", str(tree), f"{RUNNING}{workdir}/")
    assert result.returncode == 0, result.stderr
    assert sorted(w for _, w, _ in lines(result.stdout)) == [
        f"{RUNNING}{workdir}/site/css/empty.css",
        f"{RUNNING}{workdir}/site/css/main.css",
        f"{RUNNING}{workdir}/site/index.html",
    ]
    listing = run_in(RUNNING, "sh", "-c", f"cd {workdir} && find . -type f | sort")
    assert listing.split() == ["./site/css/empty.css", "./site/css/main.css", "./site/index.html"]
    assert run_in(RUNNING, "cat", f"{workdir}/site/css/main.css") == "h1 { color: red }\n"


@pytest.mark.incus
def test_standard_input_is_pushed(delivering: Service, workdir: str) -> None:
    body = b"from a pipe\n" * 1000
    dest = f"{workdir}/from-stdin.txt"
    result = delivering.run("push", "--wait", "--json", "-p", "-", f"{RUNNING}{dest}", stdin=body)
    assert result.returncode == 0, result.stderr
    [task] = json.loads(result.stdout)  # --json: the final task objects, nothing else
    assert (task["status"], task["path"], task["size"]) == ("succeeded", dest, len(body))
    assert task["filename"] == "stdin"
    assert sha256_in(RUNNING, dest) == hashlib.sha256(body).hexdigest()


@pytest.mark.incus
def test_a_path_that_cannot_travel_in_a_header_lands_under_its_own_name(
    delivering: Service, workdir: str, tmp_path: Path
) -> None:
    local = tmp_path / "résumé €.txt"
    local.write_text("ok\n")
    result = delivering.run("push", "--wait", "-p", str(local), f"{RUNNING}{workdir}/")
    assert result.returncode == 0, result.stderr
    assert sha256_in(RUNNING, f"{workdir}/résumé €.txt") == hashlib.sha256(b"ok\n").hexdigest()
    assert UploadTask.objects.get().filename == "résumé €.txt"

    piped = delivering.run("push", "--wait", "-", f"{RUNNING}{workdir}/naïve.txt", stdin=b"in\n")
    assert piped.returncode == 0, piped.stderr
    assert sha256_in(RUNNING, f"{workdir}/naïve.txt") == hashlib.sha256(b"in\n").hexdigest()


class FaultyProxy:
    """A TCP proxy in front of the real server that spoils the first connection, then relays
    every later one untouched.

    Fault injection: the real server cannot be made to lose an answer, or to say 503, on demand.
    `fault="lose-answer"` forwards the whole first request, lets the server answer it, and
    closes the client's connection without that answer (a connection that drops after the
    body). `fault="busy"` answers the first request itself with 503 and Retry-After.
    """

    def __init__(self, upstream_port: int, fault: str) -> None:
        self.upstream_port = upstream_port
        self.fault = fault
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            first = self.connections == 1
            threading.Thread(target=self._serve, args=(client, first), daemon=True).start()

    def _serve(self, client: socket.socket, first: bool) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        if not first:
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()
            return
        request = self._read_request(client)
        if self.fault == "lose-answer":
            upstream.sendall(request)
            upstream.recv(1)  # the server has answered: the upload is accepted…
        else:
            body = b'{"detail": "Too many uploads are waiting; try again later."}'
            client.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        upstream.close()
        client.close()  # …and its answer never reaches the client

    @staticmethod
    def _read_request(sock: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
        while len(body) < length:
            body += sock.recv(65536)
        return head + b"\r\n\r\n" + body

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def faulty_proxy(delivering: Service) -> Iterator[Callable[[str], FaultyProxy]]:
    proxies: list[FaultyProxy] = []

    def make(fault: str) -> FaultyProxy:
        proxies.append(FaultyProxy(delivering.server.port, fault))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.mark.incus
def test_resend_after_a_lost_answer_creates_one_task(
    delivering: Service,
    faulty_proxy: Callable[[str], FaultyProxy],
    workdir: str,
    tmp_path: Path,
) -> None:
    proxy = faulty_proxy("lose-answer")
    local = tmp_path / "once.txt"
    local.write_text("exactly once\n")
    dest = f"{workdir}/once.txt"
    result = delivering.run("push", "--wait", "-p", str(local), f"{RUNNING}{dest}", url=proxy.url)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        rf"uploadsvc: upload: cannot reach {proxy.url}: .+; trying again in \d\.\ds\n",
        result.stderr,
    ), result.stderr
    [(task_id, _, status)] = lines(result.stdout)
    assert status == "succeeded"
    assert proxy.connections >= 2
    assert list(UploadTask.objects.values_list("id", flat=True)) == [uuid.UUID(task_id)]
    assert AuditEvent.objects.filter(action="upload", outcome="replayed").count() == 1
    assert run_in(RUNNING, "cat", dest) == "exactly once\n"


@pytest.mark.incus
def test_503_is_retried_after_the_time_retry_after_asks(
    delivering: Service,
    faulty_proxy: Callable[[str], FaultyProxy],
    workdir: str,
    tmp_path: Path,
) -> None:
    proxy = faulty_proxy("busy")
    local = tmp_path / "later.txt"
    local.write_text("later\n")
    started = time.monotonic()
    result = delivering.run(
        "push", "-p", str(local), f"{RUNNING}{workdir}/later.txt", url=proxy.url
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        "uploadsvc: upload: 503 Service Unavailable: Too many uploads are waiting; try again "
        "later.; trying again in 2.0s\n"
    )
    assert elapsed >= 2.0  # our own first back-off would be 0.5-1 s
    assert UploadTask.objects.count() == 1


@pytest.mark.incus
def test_status_ls_cancel_retry_and_a_wait_that_times_out(
    service: Service, workdir: str, tmp_path: Path
) -> None:
    local = tmp_path / "queued.txt"
    local.write_text("queued\n")
    dest = f"{workdir}/queued.txt"
    # No workers yet: uploads are accepted and stay pending.
    pushed = service.run("push", str(local), f"{RUNNING}{dest}")
    assert pushed.returncode == 0, pushed.stderr
    [(task_id, _, status)] = lines(pushed.stdout)
    assert status == "pending"

    shown = service.run("status", "--json", task_id)
    assert shown.returncode == 0, shown.stderr
    task = json.loads(shown.stdout)
    assert (task["id"], task["status"], task["container"], task["path"]) == (
        task_id,
        "pending",
        RUNNING,
        dest,
    )
    assert task["sha256"] == hashlib.sha256(b"queued\n").hexdigest()

    waited = service.run("status", "--wait", "--timeout", "1", task_id)
    assert waited.returncode == 1
    assert waited.stderr == (
        "uploadsvc: timed out after 1s waiting for 1 of 1 upload(s), still unfinished:\n"
        f"  {task_id}  {RUNNING}{dest}  pending (attempt 0 of 5)\n"
    )

    other = service.run("push", str(local), f"{RUNNING}{workdir}/other.txt")
    [(other_id, _, _)] = lines(other.stdout)
    cancelled = service.run("cancel", other_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout == f"{other_id}  {RUNNING}{workdir}/other.txt  cancelled\n"
    again = service.run("cancel", other_id)
    assert again.returncode == 1
    assert again.stderr.startswith("uploadsvc: 409 Conflict: ")

    listed = service.run("ls", "--status", "cancelled", "--json")
    assert [t["id"] for t in json.loads(listed.stdout)] == [other_id]
    table = service.run("ls", "--container", RUNNING).stdout.splitlines()
    assert table[0].split() == ["ID", "STATUS", "SIZE", "CREATED", "DESTINATION"]
    assert [row.split()[:3] for row in table[1:]] == [
        [other_id, "cancelled", "7"],
        [task_id, "pending", "7"],
    ]

    # The workers find no parent directory (no -p): the push fails; made by hand, a retry lands.
    service.start_workers()
    failed = service.run("status", "--wait", task_id)
    assert failed.returncode == 1
    assert failed.stderr == (
        f"uploadsvc: push to {RUNNING}{dest} failed: parent directory {workdir} does not exist "
        f"in {RUNNING} (set create_dirs)\n"
    )
    run_in(RUNNING, "mkdir", "-p", workdir)
    retried = service.run("retry", "--json", task_id)
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["status"] in ("pending", "running", "succeeded")
    landed = service.run("status", "--wait", task_id)
    assert landed.returncode == 0, landed.stderr
    assert "Status: succeeded" in landed.stdout.splitlines()
    assert re.search(r"^Attempts: 2 of \d+$", landed.stdout, re.MULTILINE)
    assert UploadTask.objects.get(pk=task_id).status == Status.SUCCEEDED
    assert run_in(RUNNING, "cat", dest) == "queued\n"

    unknown = service.run("status", str(uuid.uuid4()))
    assert unknown.returncode == 1
    assert "(or it is not yours)" in unknown.stderr


@pytest.mark.incus
def test_progress_line_on_a_terminal(delivering: Service, workdir: str, tmp_path: Path) -> None:
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(8 << 20))
    controller, terminal = pty.openpty()
    # A terminal 250 columns wide: the progress line is cut to the width of its terminal.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
    env = {**os.environ, "UPLOADSVC_URL": delivering.url, "UPLOADSVC_TOKEN": delivering.token}
    proc = subprocess.Popen(
        [UPLOADSVC, "push", "--wait", "-p", str(local), f"{RUNNING}{workdir}/big.bin"],
        stdout=subprocess.PIPE,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    assert proc.wait(timeout=60) == 0
    assert proc.stdout is not None
    assert lines(proc.stdout.read().decode())[0][2] == "succeeded"
    screen = seen.decode()
    assert f"Pushing {local} to {RUNNING}{workdir}/big.bin: 100% (" in screen
    assert f"Pushing {local} to {RUNNING}{workdir}/big.bin: waiting" in screen
    assert f"Waiting for {RUNNING}{workdir}/big.bin: landed" in screen
    assert screen.endswith("\r\x1b[K")  # the line is erased at the end


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required: <command>"),
        (["push", "a.txt"], "push needs a source and a target"),
        (["push", "a.txt", "web1"], "invalid target 'web1': expected [<remote>:]<instance>/<path>"),
        (["push", "-", "b.txt", "web1/x/"], "'-' (standard input) must be the only source"),
        (["push", "-", "web1/srv/"], "standard input has no file name"),
        (["push", "--mode", "0999", "a.txt", "web1/x"], "'0999' is not an octal file mode"),
        (["push", "--uid", "-1", "a.txt", "web1/x"], "-1 is not between 0 and 4294967295"),
        (["push", "--remote", "b", "a.txt", "a:web1/x"], "the target names remote 'a'"),
        (["push", "a.txt", "-t", "web1/x", "-t", "web2/y"], "must differ only in the instance"),
        (["push", "-t", "web1/x"], "push needs a source"),
        (["status", "12"], "'12' is not an upload id"),
        (["ls", "--status", "lost"], "invalid choice: 'lost'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    result = subprocess.run(
        [UPLOADSVC, *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        # Nothing listens here: a usage error must not need the server.
        env={**os.environ, "UPLOADSVC_URL": "http://127.0.0.1:9"},
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("usage: uploadsvc")
    assert message in result.stderr


def test_help_reads_like_incus_file_push() -> None:
    result = subprocess.run(
        [UPLOADSVC, "push", "--help"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith(
        "usage: uploadsvc push [flags] <source path>... "
        "[<remote>:]<instance>[,<instance>...]/<path>\n"
    )
    for flag in ("-p, --create-dirs", "-r, --recursive", "--mode MODE", "--uid UID", "--wait"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    "text, target",
    [
        ("web1/etc/app.conf", Target("web1", "/etc/app.conf", None, False)),
        ("web1/srv/app/", Target("web1", "/srv/app", None, True)),
        ("web1/", Target("web1", "/", None, True)),
        ("web1//srv/./a/../b", Target("web1", "/srv/b", None, False)),
        ("prod:web1/etc/x", Target("web1", "/etc/x", "prod", False)),
    ],
)
def test_targets_are_read_like_incus_file_push(text: str, target: Target) -> None:
    assert parse_target(text) == target


@pytest.mark.parametrize("text", ["web1", "/etc/x", ":web1/x"])
def test_malformed_targets(text: str) -> None:
    with pytest.raises(UsageError):
        parse_target(text)


def test_the_client_imports_nothing_from_django_or_the_app() -> None:
    code = (
        "import sys, uploads.cli.main; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'django', 'rest_framework', "
        "'uploadsvc'}), sorted(m for m in sys.modules if m.startswith('uploads.') "
        "and not m.startswith('uploads.cli')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout == "[] []\n"
