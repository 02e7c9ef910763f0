"""Look inside real Incus instances from tests, with the incus CLI."""

import hashlib
import subprocess
import uuid

RUNNING = "uploadsvc-run"
STOPPED = "uploadsvc-stopped"
P2_PROJECT = "uploadsvc-p2"
P2_RUNNING = "uploadsvc-p2run"
IMAGE = "uploadsvc-busybox"


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
