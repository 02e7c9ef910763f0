"""Helpers for tests against the real Incus: look inside its instances with the incus CLI, and
send uploads through the API to a worker that pushes them there."""

import hashlib
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

from rest_framework.test import APIClient

from uploads.incus import IncusPusher
from uploads.models import UploadTask
from uploads.worker import Worker

RUNNING = "uploadsvc-run"
STOPPED = "uploadsvc-stopped"
P2_PROJECT = "uploadsvc-p2"
P2_RUNNING = "uploadsvc-p2run"
IMAGE = "uploadsvc-busybox"
# What scripts/incus-test-env (`make incus`) makes: instances and the state they are kept in, the
# image they are made from, and the same daemon on HTTPS with a trusted client certificate.
INSTANCES = {
    ("default", RUNNING): "Running",
    ("default", STOPPED): "Stopped",
    (P2_PROJECT, P2_RUNNING): "Running",
}
HTTPS_ADDRESS = "127.0.0.1:8443"
CLIENT_DIR = Path("/var/lib/uploadsvc-test")


def _query(path: str) -> tuple[Any, str]:
    """`incus query path`: (the answer, "") or (None, why there is none)."""
    try:
        result = subprocess.run(
            ["incus", "query", path], capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError:
        return None, "the incus command is not installed"
    except subprocess.TimeoutExpired:
        return None, "no answer in 30 s"
    if result.returncode != 0:
        return None, result.stderr.strip().removeprefix("Error: ")
    return json.loads(result.stdout), ""


def environment_problems(
    *,
    image: str = IMAGE,
    instances: dict[tuple[str, str], str] = INSTANCES,
    https_address: str = HTTPS_ADDRESS,
    client_dir: Path = CLIENT_DIR,
) -> list[str]:
    """What the Incus tests need and the daemon lacks, asked through the incus CLI the tests
    use: the image, the projects, the instances in their states, the HTTPS listener and the
    client certificate. Empty when all is there."""
    problems: list[str] = []
    alias, why = _query(f"/1.0/images/aliases/{image}")
    if alias is None:
        problems.append(f"no image {image} ({why})")
    for project in sorted({project for project, _ in instances} - {"default"}):
        found, why = _query(f"/1.0/projects/{project}")
        if found is None:
            problems.append(f"no project {project} ({why})")
    for (project, name), wanted in instances.items():
        instance, why = _query(f"/1.0/instances/{name}?project={project}")
        if instance is None:
            problems.append(f"no instance {name} in project {project} ({why})")
        elif instance["status"] != wanted:
            problems.append(f"{name} in project {project} is {instance['status']}, not {wanted}")
    server, _ = _query("/1.0")
    if server is not None and server["config"].get("core.https_address") != https_address:
        problems.append(f"Incus does not listen on https://{https_address}")
    for name in ("client.crt", "client.key", "server.crt"):
        if not (client_dir / name).is_file():
            problems.append(f"no {client_dir / name}")
    return problems


def incus(*args: str, project: str = "default", check: bool = True) -> str:
    result = subprocess.run(
        ["incus", "--project", project, *args], capture_output=True, check=False, timeout=120
    )
    if check and result.returncode != 0:
        raise AssertionError(f"incus {' '.join(args)} failed: {result.stderr.decode()}")
    return result.stdout.decode()


def run_in(instance: str, *command: str, project: str = "default") -> str:
    return incus("exec", instance, "--", *command, project=project)


def sha256_in(instance: str, path: str, project: str = "default") -> str:
    """The file's SHA-256 as the instance sees it (pulled through Incus when it is stopped)."""
    state = incus("list", instance, "--format", "csv", "--columns", "s", project=project).strip()
    if state == "RUNNING":
        return run_in(instance, "sha256sum", path, project=project).split()[0]
    data = subprocess.run(
        ["incus", "--project", project, "file", "pull", f"{instance}{path}", "-"],
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    return hashlib.sha256(data).hexdigest()


def stat_in(instance: str, path: str, project: str = "default") -> tuple[str, int, int, int]:
    """(octal mode, uid, gid, size) of a path inside a running instance."""
    mode, uid, gid, size = run_in(
        instance, "stat", "-c", "%a %u %g %s", path, project=project
    ).split()
    return mode, int(uid), int(gid), int(size)


def unique_dir() -> str:
    return f"/tmp/uploadsvc-test-{uuid.uuid4().hex[:12]}"


def unique_name(prefix: str = "uploadsvc-escape") -> str:
    """A file name no other test run uses, e.g. for a target outside a grant."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def is_running(instance: str, project: str = "default") -> bool:
    state = incus("list", instance, "--format", "csv", "--columns", "s", project=project)
    return state.strip() == "RUNNING"


def exists_in(instance: str, path: str, project: str = "default") -> bool:
    """Whether anything is at `path` inside the instance: a file, a directory or a link, even a
    dangling one. A stopped instance is asked through `incus file pull`, which follows links."""
    if is_running(instance, project):
        answer = run_in(
            instance,
            "sh",
            "-c",
            'if [ -e "$1" ] || [ -L "$1" ]; then echo yes; else echo no; fi',
            "sh",
            path,
            project=project,
        )
        return answer.strip() == "yes"
    result = subprocess.run(
        ["incus", "--project", project, "file", "pull", f"{instance}{path}", "-"],
        capture_output=True,
        check=False,
        timeout=120,
    )
    if result.returncode == 0:
        return True
    if b"does not exist" in result.stderr:
        return False
    raise AssertionError(f"incus file pull {instance}{path} failed: {result.stderr.decode()}")


def entries_in(instance: str, directory: str, project: str = "default") -> list[str]:
    """The names in a directory of a running instance, dot files included."""
    return sorted(run_in(instance, "ls", "-A1", directory, project=project).split())


def symlink_in(
    instance: str, link: str, target: str, *, uid: int | None = None, project: str = "default"
) -> None:
    """`busybox ln -s target link` inside a running instance, as root or as the given uid (and
    the same gid): what a process in the instance can do."""
    user = [] if uid is None else ["--user", str(uid), "--group", str(uid)]
    incus("exec", *user, instance, "--", "busybox", "ln", "-s", target, link, project=project)


def readlink_in(instance: str, path: str, project: str = "default") -> str:
    return run_in(instance, "busybox", "readlink", path, project=project).strip()


def upload(
    api: APIClient, body: bytes, container: str, path: str, **headers: str
) -> dict[str, Any]:
    meta = {f"HTTP_{k.upper()}": v for k, v in headers.items()}
    response = api.generic(
        "POST",
        "/api/uploads/",
        body,
        content_type="application/octet-stream",
        HTTP_X_CONTAINER_NAME=container,
        HTTP_X_FILE_PATH=path,
        **meta,
    )
    assert response.status_code == 202, response.content
    data: dict[str, Any] = response.json()
    return data


def run_worker(threads: int = 2) -> None:
    assert (
        Worker(threads=threads, burst=True, poll_interval=0.05, pusher_factory=IncusPusher).run()
        == 0
    )


def task_of(data: dict[str, Any]) -> UploadTask:
    return UploadTask.objects.get(pk=data["id"])
