"""How IncusPusher delivers a file, against the real Incus: atomic replace, mode and owner on new
files and overwrites, parents, leftovers of dead pushes, stopped instances, projects, errors.

Checked from inside the instance with the incus CLI, never through the pusher itself.
"""

import hashlib
import os
import posixpath
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.incus_utils import (
    IMAGE,
    P2_PROJECT,
    P2_RUNNING,
    RUNNING,
    STOPPED,
    incus,
    run_in,
    sha256_in,
    stat_in,
    unique_dir,
)
from uploads.incus import IncusPusher
from uploads.pushers import (
    NotHeld,
    OutsideGrant,
    PermanentPushError,
    PushRequest,
    TransientPushError,
)

pytestmark = pytest.mark.incus


@pytest.fixture(autouse=True)
def _needs_incus(incus: str) -> None:
    """Skips (or with REQUIRE_INCUS=1 fails) every test here when no Incus is reachable."""


@pytest.fixture
def pusher(incus: str) -> Iterator[IncusPusher]:
    pusher = IncusPusher(endpoint=incus, timeout=30)
    yield pusher
    pusher.close()


@pytest.fixture
def workdir() -> Iterator[str]:
    path = unique_dir()
    run_in(RUNNING, "mkdir", "-p", path)
    yield path
    run_in(RUNNING, "rm", "-rf", path)


def source_file(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / f"source-{uuid.uuid4().hex}"
    path.write_bytes(body)
    return path


def push(
    pusher: IncusPusher,
    tmp_path: Path,
    body: bytes,
    path: str,
    instance: str = RUNNING,
    project: str = "default",
    **options: Any,
) -> None:
    source = source_file(tmp_path, body)
    pusher.push(
        PushRequest(
            open_source=partial(open, source, "rb"),
            size=len(body),
            instance=instance,
            project=project,
            path=path,
            **options,
        )
    )


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def listing(instance: str, directory: str) -> list[str]:
    return sorted(run_in(instance, "ls", "-a", directory).split())


def test_new_file_is_0644_root_with_the_content(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    body = os.urandom(100_000)
    push(pusher, tmp_path, body, f"{workdir}/new.bin")
    assert stat_in(RUNNING, f"{workdir}/new.bin") == ("644", 0, 0, len(body))
    assert sha256_in(RUNNING, f"{workdir}/new.bin") == digest(body)
    assert listing(RUNNING, workdir) == [".", "..", "new.bin"]  # no temporary file left


def test_overwrite_applies_the_requested_mode_and_owner(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    path = f"{workdir}/secret.txt"
    push(pusher, tmp_path, b"first\n", path, mode=0o644)
    assert stat_in(RUNNING, path)[:3] == ("644", 0, 0)
    push(pusher, tmp_path, b"second, longer\n", path, mode=0o600, uid=1000, gid=1000)
    assert stat_in(RUNNING, path) == ("600", 1000, 1000, 15)
    assert run_in(RUNNING, "cat", path) == "second, longer\n"


def test_overwrite_without_mode_or_owner_keeps_the_existing_ones(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    path = f"{workdir}/kept.txt"
    push(pusher, tmp_path, b"v1\n", path, mode=0o750, uid=1000, gid=1000)
    push(pusher, tmp_path, b"v2 v2\n", path)
    assert stat_in(RUNNING, path) == ("750", 1000, 1000, 6)
    push(pusher, tmp_path, b"v3\n", path, gid=0)
    assert stat_in(RUNNING, path) == ("750", 1000, 0, 3)
    # Changed inside the instance: the next push keeps what it finds.
    run_in(RUNNING, "chmod", "0604", path)
    push(pusher, tmp_path, b"v4\n", path)
    assert stat_in(RUNNING, path) == ("604", 1000, 0, 3)


def test_setuid_setgid_and_sticky_bits_are_refused(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    """Incus drops them on chmod; a push must not pretend to have set them."""
    with pytest.raises(PermanentPushError) as failure:
        push(pusher, tmp_path, b"x", f"{workdir}/suid", mode=0o4755)
    assert failure.value.message == "mode 4755: Incus cannot set setuid, setgid or sticky bits"
    assert listing(RUNNING, workdir) == [".", ".."]


def test_a_reader_never_sees_a_partial_file_during_an_overwrite(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    path = f"{workdir}/big.bin"
    old = os.urandom(1 << 20)
    push(pusher, tmp_path, old, path)
    new_source = tmp_path / "new.bin"
    with new_source.open("wb") as out:
        for _ in range(200):
            out.write(os.urandom(1 << 20))
    new_size = 200 << 20
    stop = f"{workdir}/stop-reading"
    sizes_file = tmp_path / "sizes.txt"
    # Polls inside the instance as fast as busybox can, printing what it sees, until told to
    # stop. A missing path would print "missing".
    loop = f"while [ ! -e {stop} ]; do stat -c %s {path} 2>/dev/null || echo missing; done"
    with sizes_file.open("wb") as sizes:
        reader = subprocess.Popen(["incus", "exec", RUNNING, "--", "sh", "-c", loop], stdout=sizes)
        try:
            deadline = time.monotonic() + 20
            while sizes_file.stat().st_size == 0:
                assert time.monotonic() < deadline, "the reader did not start"
                time.sleep(0.02)
            pusher.push(
                PushRequest(
                    open_source=partial(open, new_source, "rb"),
                    size=new_size,
                    instance=RUNNING,
                    project="default",
                    path=path,
                )
            )
            time.sleep(0.2)
            run_in(RUNNING, "touch", stop)
            assert reader.wait(timeout=30) == 0
        finally:
            reader.kill()
    seen = sizes_file.read_text().split()
    assert set(seen) == {str(len(old)), str(new_size)}, set(seen)
    # Seen before and after: the reader really polled across the push.
    assert seen[0] == str(len(old)) and seen[-1] == str(new_size)
    assert stat_in(RUNNING, path)[3] == new_size


def test_concurrent_pushes_to_one_path_all_succeed_and_one_of_them_wins(
    incus: str, tmp_path: Path, workdir: str
) -> None:
    path = f"{workdir}/contended.bin"
    bodies = [os.urandom(50_000 * (n + 1)) for n in range(3)]
    errors: list[Exception] = []

    def pushes(body: bytes) -> None:
        pusher = IncusPusher(endpoint=incus, timeout=30)
        try:
            for _ in range(10):
                push(pusher, tmp_path, body, path)
        except Exception as exc:
            errors.append(exc)
        finally:
            pusher.close()

    threads = [threading.Thread(target=pushes, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sha256_in(RUNNING, path) in {digest(body) for body in bodies}
    assert listing(RUNNING, workdir) == [".", "..", "contended.bin"]


def test_create_dirs_makes_each_parent_0755_owned_as_requested(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    path = f"{workdir}/a/b/c.txt"
    push(pusher, tmp_path, b"deep\n", path, create_dirs=True, uid=1000, gid=1001)
    assert stat_in(RUNNING, f"{workdir}/a")[:3] == ("755", 1000, 1001)
    assert stat_in(RUNNING, f"{workdir}/a/b")[:3] == ("755", 1000, 1001)
    assert stat_in(RUNNING, path) == ("644", 1000, 1001, 5)
    assert stat_in(RUNNING, workdir)[1] == 0  # an existing parent is left alone


def test_missing_parent_without_create_dirs_fails_permanently(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    with pytest.raises(PermanentPushError) as failure:
        push(pusher, tmp_path, b"x", f"{workdir}/no/such/file.txt")
    assert (
        failure.value.message
        == f"parent directory {workdir}/no/such does not exist in {RUNNING} (set create_dirs)"
    )
    assert listing(RUNNING, workdir) == [".", ".."]


def test_a_stale_temporary_sibling_is_removed_by_the_next_push(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    stale = f"{workdir}/.app.conf.uploadsvc-0123456789ab.tmp"  # from a push that died
    live = f"{workdir}/.app.conf.uploadsvc-ba9876543210.tmp"  # a concurrent push writing now
    run_in(RUNNING, "sh", "-c", f"echo partial > {stale} && echo partial > {live}")
    run_in(RUNNING, "touch", "-d", "2001-01-01 00:00:00", stale)
    push(pusher, tmp_path, b"complete\n", f"{workdir}/app.conf")
    assert listing(RUNNING, workdir) == [
        ".",
        "..",
        ".app.conf.uploadsvc-ba9876543210.tmp",
        "app.conf",
    ]
    assert run_in(RUNNING, "cat", f"{workdir}/app.conf") == "complete\n"


def test_a_live_pushs_temporary_sibling_is_not_swept_as_stale(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    """A push may leave its sibling untouched for as long as one request can stall (the Incus
    timeout, 30 s for this pusher): a sibling idle for 45 s may still be alive and stays; one
    idle for longer than twice the timeout was left by a dead push and goes."""
    alive = f"{workdir}/.app.conf.uploadsvc-0123456789ab.tmp"
    dead = f"{workdir}/.app.conf.uploadsvc-ba9876543210.tmp"
    run_in(RUNNING, "sh", "-c", f"echo partial > {alive} && echo partial > {dead}")
    for path, age in ((alive, 45), (dead, 61)):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - age))
        run_in(RUNNING, "env", "TZ=UTC", "touch", "-d", stamp, path)
    push(pusher, tmp_path, b"complete\n", f"{workdir}/app.conf")
    assert listing(RUNNING, workdir) == [".", "..", posixpath.basename(alive), "app.conf"]


def test_a_push_its_worker_no_longer_holds_publishes_nothing(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    """Another worker took the task over: the push stops before the rename, and its
    temporary sibling goes too."""
    path = f"{workdir}/taken.txt"
    push(pusher, tmp_path, b"the old content\n", path)
    with pytest.raises(NotHeld):
        push(pusher, tmp_path, b"stale\n", path, held=lambda: False)
    assert run_in(RUNNING, "cat", path) == "the old content\n"
    assert listing(RUNNING, workdir) == [".", "..", "taken.txt"]


def test_symlinked_destination_is_written_through(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    run_in(RUNNING, "sh", "-c", f"echo old > {workdir}/real && ln -s real {workdir}/link")
    push(pusher, tmp_path, b"new\n", f"{workdir}/link", mode=0o640)
    assert run_in(RUNNING, "readlink", f"{workdir}/link") == "real\n"
    assert run_in(RUNNING, "cat", f"{workdir}/real") == "new\n"
    assert stat_in(RUNNING, f"{workdir}/real")[0] == "640"


def test_a_confined_push_refuses_links_out_of_its_grant_and_writes_nothing(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    """A link among the parents, a link as the destination and a dangling one, each leading
    out of the granted directory: refused before anything is created, anywhere."""
    granted = f"{workdir}/alice"
    outside = f"{workdir}/outside"
    run_in(RUNNING, "mkdir", "-p", granted, outside)
    run_in(RUNNING, "busybox", "ln", "-s", outside, f"{granted}/parent")
    run_in(RUNNING, "busybox", "ln", "-s", "../outside/file", f"{granted}/dest")
    run_in(RUNNING, "busybox", "ln", "-s", f"{outside}/nothing-yet", f"{granted}/dangling")
    cases = {
        f"{granted}/parent/x": f"{granted}/parent is a symbolic link to {outside}, outside",
        f"{granted}/dest": (
            f"{granted}/dest is a symbolic link to ../outside/file ({outside}/file), outside"
        ),
        f"{granted}/dangling": f"{granted}/dangling is a symbolic link to {outside}/nothing-yet",
    }
    for path, reason in cases.items():
        with pytest.raises(OutsideGrant) as refused:
            push(pusher, tmp_path, b"x", path, confined_to=(granted,))
        assert refused.value.message.startswith(reason)
        assert refused.value.message.endswith(
            f"outside the directories granted in {RUNNING}: {granted}"
        )
    assert listing(RUNNING, outside) == [".", ".."]
    assert listing(RUNNING, granted) == [".", "..", "dangling", "dest", "parent"]


def test_a_confined_push_follows_links_that_stay_inside(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    granted = f"{workdir}/alice"
    run_in(RUNNING, "mkdir", "-p", f"{granted}/releases/1")
    run_in(RUNNING, "busybox", "ln", "-s", "releases/1", f"{granted}/current")
    run_in(RUNNING, "busybox", "ln", "-s", f"{granted}/releases/1/app.conf", f"{granted}/conf")
    push(pusher, tmp_path, b"v1\n", f"{granted}/current/app.conf", confined_to=(granted,))
    push(pusher, tmp_path, b"v2\n", f"{granted}/conf", confined_to=(granted,))
    assert run_in(RUNNING, "cat", f"{granted}/releases/1/app.conf") == "v2\n"
    assert listing(RUNNING, f"{granted}/releases/1") == [".", "..", "app.conf"]


def test_a_confined_push_makes_directories_only_inside_its_grant(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    granted = f"{workdir}/opt/carol/data"
    with pytest.raises(OutsideGrant) as refused:
        push(pusher, tmp_path, b"x", f"{granted}/a/f", confined_to=(granted,), create_dirs=True)
    assert refused.value.message == (
        f"the granted directory {granted} does not exist in {RUNNING}; "
        "create_dirs makes directories only inside it"
    )
    assert listing(RUNNING, workdir) == [".", ".."]

    run_in(RUNNING, "mkdir", "-p", granted)
    options: dict[str, Any] = {"confined_to": (granted,), "uid": 1000, "gid": 1000}
    with pytest.raises(PermanentPushError, match="does not exist .* \\(set create_dirs\\)"):
        push(pusher, tmp_path, b"x", f"{granted}/a/b/f", **options)
    push(pusher, tmp_path, b"x", f"{granted}/a/b/f", create_dirs=True, **options)
    assert stat_in(RUNNING, f"{granted}/a")[:3] == ("755", 1000, 1000)
    assert stat_in(RUNNING, f"{granted}/a/b")[:3] == ("755", 1000, 1000)
    assert stat_in(RUNNING, granted)[:3] == ("755", 0, 0)  # the granted directory is left alone


def test_push_into_the_stopped_instance(pusher: IncusPusher, tmp_path: Path) -> None:
    body = os.urandom(70_000)
    path = f"/root/uploadsvc-{uuid.uuid4().hex}.bin"
    try:
        push(pusher, tmp_path, body, path, instance=STOPPED, mode=0o600)
        assert sha256_in(STOPPED, path) == digest(body)
        push(pusher, tmp_path, body[:10], path, instance=STOPPED)
        assert sha256_in(STOPPED, path) == digest(body[:10])
        assert incus("list", STOPPED, "--format", "csv", "--columns", "s").strip() == "STOPPED"
    finally:
        incus("file", "delete", f"{STOPPED}{path}", check=False)


def test_second_project(pusher: IncusPusher, tmp_path: Path) -> None:
    body = b"project two\n"
    path = f"/tmp/uploadsvc-{uuid.uuid4().hex}.txt"
    try:
        push(pusher, tmp_path, body, path, instance=P2_RUNNING, project=P2_PROJECT, uid=1000)
        assert sha256_in(P2_RUNNING, path, project=P2_PROJECT) == digest(body)
        assert stat_in(P2_RUNNING, path, project=P2_PROJECT)[:2] == ("644", 1000)
        with pytest.raises(PermanentPushError) as failure:
            push(pusher, tmp_path, body, path, instance=P2_RUNNING)
        assert failure.value.message == f"instance '{P2_RUNNING}' not found in project 'default'"
    finally:
        run_in(P2_RUNNING, "rm", "-f", path, project=P2_PROJECT)


def test_missing_instance_fails_permanently(pusher: IncusPusher, tmp_path: Path) -> None:
    name = f"uploadsvc-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(PermanentPushError) as failure:
        push(pusher, tmp_path, b"x", "/root/x", instance=name)
    assert failure.value.message == f"instance '{name}' not found in project 'default'"


def test_a_missing_project_is_named_as_such(pusher: IncusPusher, tmp_path: Path) -> None:
    with pytest.raises(PermanentPushError) as failure:
        push(pusher, tmp_path, b"x", "/root/x", project="uploadsvc-no-such-project")
    assert failure.value.message == (
        "project 'uploadsvc-no-such-project' does not exist on remote 'local'"
    )


def test_destination_that_is_a_directory_fails_permanently(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    run_in(RUNNING, "mkdir", f"{workdir}/dir")
    with pytest.raises(PermanentPushError) as failure:
        push(pusher, tmp_path, b"x", f"{workdir}/dir")
    assert failure.value.message == f"{workdir}/dir is a directory in {RUNNING}"
    assert listing(RUNNING, workdir) == [".", "..", "dir"]


def test_size_mismatch_is_transient_and_keeps_the_old_file(
    pusher: IncusPusher, tmp_path: Path, workdir: str
) -> None:
    path = f"{workdir}/sized.txt"
    push(pusher, tmp_path, b"good old content\n", path)
    source = source_file(tmp_path, b"new")
    with pytest.raises(TransientPushError):
        pusher.push(
            PushRequest(
                open_source=partial(open, source, "rb"),
                size=4,
                instance=RUNNING,
                project="default",
                path=path,
            )
        )
    assert run_in(RUNNING, "cat", path) == "good old content\n"
    assert listing(RUNNING, workdir) == [".", "..", "sized.txt"]


def test_sha256_verification(
    pusher: IncusPusher, tmp_path: Path, workdir: str, settings: Any
) -> None:
    settings.UPLOADS = {**settings.UPLOADS, "VERIFY_SHA256": True}
    body = os.urandom(3 << 20)
    push(pusher, tmp_path, body, f"{workdir}/checked.bin")
    assert sha256_in(RUNNING, f"{workdir}/checked.bin") == digest(body)


def test_sessions_survive_restarts_and_never_hold_an_instance(
    pusher: IncusPusher, tmp_path: Path, settings: Any
) -> None:
    """A kept session blocks `incus start` and a graceful `incus stop` while it is open: idle
    ones must close on their own; a session broken by a restart is replaced without an error."""
    settings.UPLOADS = {**settings.UPLOADS, "SFTP_IDLE_SECONDS": 0.3}
    name = f"uploadsvc-dlv-{uuid.uuid4().hex[:8]}"
    incus("init", IMAGE, name)
    try:
        push(pusher, tmp_path, b"while stopped\n", "/root/one.txt", instance=name)
        time.sleep(1)  # the idle session closes; start would otherwise wait for it
        incus("start", name)
        assert run_in(name, "cat", "/root/one.txt") == "while stopped\n"
        push(pusher, tmp_path, b"running\n", "/root/two.txt", instance=name)
        incus("restart", "--force", name)  # breaks the session kept by the push above
        push(pusher, tmp_path, b"after restart\n", "/root/three.txt", instance=name)
        assert run_in(name, "cat", "/root/three.txt") == "after restart\n"
        time.sleep(1)
        incus("stop", "--timeout", "20", name)
    finally:
        incus("delete", "--force", name, check=False)
