"""The attacker's suite for grants, against the real Incus: a normal user whose grant covers one
directory of one instance tries to write outside it through what the instance's filesystem holds
(links in the parents or at the destination, links planted after acceptance or by an
unprivileged process in the instance), through create_dirs above the grant and with a path equal
to the granted directory. Every test looks inside the instance afterwards: nothing may land
outside the grant, and a refusal is permanent and audited. Links that stay inside the grant, and
a superuser's links to anywhere, keep working.

Each test works in a fresh directory of the instance (`<root>/srv/alice` is the grant) and
names every target outside the grant uniquely, so concurrent runs never meet.
"""

import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from tests.conftest import spool_files, token_client
from tests.incus_utils import (
    RUNNING,
    STOPPED,
    entries_in,
    exists_in,
    incus,
    is_running,
    readlink_in,
    run_in,
    run_worker,
    stat_in,
    symlink_in,
    unique_dir,
    unique_name,
)
from uploads.models import AuditEvent, Grant, Outcome, Status, UploadAttempt, UploadTask

pytestmark = [pytest.mark.incus, pytest.mark.django_db(transaction=True)]

BODY = b"written by the attacker\n"


@pytest.fixture(autouse=True)
def _needs_incus(incus: str) -> None:
    """Every test here looks inside the real instances."""


@dataclass(frozen=True)
class Tree:
    root: str
    granted: str


@pytest.fixture
def tree() -> Iterator[Tree]:
    """A fresh directory in the running instance; its srv/alice is what the tests grant."""
    root = unique_dir()
    granted = f"{root}/srv/alice"
    run_in(RUNNING, "mkdir", "-p", granted)
    yield Tree(root=root, granted=granted)
    run_in(RUNNING, "rm", "-rf", root)


@pytest.fixture
def outside() -> Iterator[Callable[..., str]]:
    """Unique paths outside any grant in the running instance (`outside("/etc")` gives
    /etc/uploadsvc-escape-<hex>); whatever ends up there is removed afterwards."""
    made: list[str] = []

    def make(directory: str, suffix: str = "") -> str:
        path = f"{directory}/{unique_name()}{suffix}"
        made.append(path)
        return path

    yield make
    for path in made:
        run_in(RUNNING, "rm", "-rf", path)


@pytest.fixture
def alice(django_user_model: Any) -> Any:
    """A normal user; each test gives her the grant it attacks."""
    return django_user_model.objects.create_user(username="alice", password="pw-alice-123")


@pytest.fixture
def alice_api(alice: Any) -> APIClient:
    return token_client(alice)


def grant(user: Any, *prefixes: str, instance: str = RUNNING, **fields: Any) -> Grant:
    return Grant.objects.create(
        user=user,
        remote="local",
        project="default",
        instance_glob=instance,
        path_prefixes=list(prefixes),
        **fields,
    )


def send(
    api: APIClient, path: str, body: bytes = BODY, container: str = RUNNING, **headers: str
) -> Any:
    meta = {f"HTTP_{name.upper()}": value for name, value in headers.items()}
    return api.generic(
        "POST",
        "/api/uploads/",
        body,
        content_type="application/octet-stream",
        HTTP_X_CONTAINER_NAME=container,
        HTTP_X_FILE_PATH=path,
        **meta,
    )


def accepted(
    api: APIClient, path: str, body: bytes = BODY, container: str = RUNNING, **headers: str
) -> UploadTask:
    response = send(api, path, body, container, **headers)
    assert response.status_code == 202, response.content
    return UploadTask.objects.get(pk=response.json()["id"])


def pushed(task: UploadTask) -> UploadTask:
    run_worker()
    task.refresh_from_db()
    return task


def assert_absent(path: str, instance: str = RUNNING) -> None:
    assert not exists_in(instance, path), f"escaped the grant: {path} exists in {instance}"


def assert_refused_outside(task: UploadTask, *mentions: str, attempts: int = 1) -> None:
    """Failed for good at this attempt, saying why, with a push refusal in the audit log."""
    assert task.status == Status.FAILED, f"{task.status}: {task.last_error or 'delivered'}"
    assert task.attempts == attempts
    assert "outside" in task.last_error, task.last_error
    for text in mentions:
        assert text in task.last_error, task.last_error
    assert AuditEvent.objects.filter(action="push", outcome="refused", task_id=task.pk).exists()


def everything_in(directory: str) -> list[str]:
    """Every path under a directory of the running instance (links are listed, not followed)."""
    return sorted(run_in(RUNNING, "busybox", "find", directory).split())


def named(directory: str, name: str) -> list[str]:
    """Entries of a directory in the running instance that carry `name`: the file itself or a
    temporary sibling `.<name>.uploadsvc-<hex>.tmp`."""
    return [entry for entry in entries_in(RUNNING, directory) if name in entry]


# --- links in the parents ------------------------------------------------------------------


def test_symlinked_parent_leading_to_etc_writes_nothing(
    tree: Tree, outside: Callable[..., str], alice: Any, alice_api: APIClient
) -> None:
    """Attack: the instance holds <grant>/etc -> /etc. Alice uploads <grant>/etc/<name> with mode
    0644; the path string is inside her grant, but the push would follow the link and create
    /etc/<name> as root. It must fail at once naming the link and where it leads, and write
    nothing: not in /etc, not in the grant, no temporary file."""
    grant(alice, tree.granted)
    target = outside("/etc")
    name = posixpath.basename(target)
    link = f"{tree.granted}/etc"
    symlink_in(RUNNING, link, "/etc")

    task = pushed(accepted(alice_api, f"{link}/{name}", x_file_mode="0644"))

    assert_absent(target)
    assert named("/etc", name) == []
    assert entries_in(RUNNING, tree.granted) == ["etc"]
    assert_refused_outside(task, link, tree.granted)
    assert "/etc" in task.last_error.replace(link, ""), "where the link leads"


def _relative_link_climbing_out(tree: Tree, out: str) -> tuple[str, dict[str, str]]:
    symlink_in(RUNNING, f"{tree.granted}/up", "../" * 16 + out.lstrip("/"))
    return f"{tree.granted}/up/file.txt", {}


def _link_to_a_link_leading_out(tree: Tree, out: str) -> tuple[str, dict[str, str]]:
    symlink_in(RUNNING, f"{tree.granted}/b", out)
    symlink_in(RUNNING, f"{tree.granted}/a", "b")
    return f"{tree.granted}/a/file.txt", {}


def _dot_dot_after_a_link(tree: Tree, out: str) -> tuple[str, dict[str, str]]:
    # <grant>/s -> s2/.. reads as <grant> when `..` is applied to the text, but the instance
    # follows s2 first: s2/.. is the directory above s2's target, i.e. `out`.
    run_in(RUNNING, "mkdir", f"{out}/sub")
    symlink_in(RUNNING, f"{tree.granted}/s2", f"{out}/sub")
    symlink_in(RUNNING, f"{tree.granted}/s", "s2/..")
    return f"{tree.granted}/s/file.txt", {}


def _link_in_a_middle_component(tree: Tree, out: str) -> tuple[str, dict[str, str]]:
    # The destination's own parent, looked up alone, is a real directory (out/deep).
    run_in(RUNNING, "mkdir", f"{out}/deep")
    symlink_in(RUNNING, f"{tree.granted}/m", out)
    return f"{tree.granted}/m/deep/file.txt", {}


def _granted_directory_is_a_link(tree: Tree, out: str) -> tuple[str, dict[str, str]]:
    run_in(RUNNING, "rmdir", tree.granted)
    symlink_in(RUNNING, tree.granted, out)
    return f"{tree.granted}/file.txt", {}


def _directory_above_the_grant_is_a_link(tree: Tree, out: str) -> tuple[str, dict[str, str]]:
    run_in(RUNNING, "mkdir", f"{out}/alice")
    run_in(RUNNING, "rm", "-rf", f"{tree.root}/srv")
    symlink_in(RUNNING, f"{tree.root}/srv", out)
    return f"{tree.granted}/file.txt", {}


def _create_dirs_through_a_link(tree: Tree, out: str) -> tuple[str, dict[str, str]]:
    symlink_in(RUNNING, f"{tree.granted}/l", out)
    return f"{tree.granted}/l/new/file.txt", {"x_create_dirs": "true"}


@pytest.mark.parametrize(
    "layout",
    [
        _relative_link_climbing_out,
        _link_to_a_link_leading_out,
        _dot_dot_after_a_link,
        _link_in_a_middle_component,
        _granted_directory_is_a_link,
        _directory_above_the_grant_is_a_link,
        _create_dirs_through_a_link,
    ],
    ids=lambda layout: layout.__name__.strip("_"),
)
def test_parent_links_that_lead_outside_write_nothing(
    tree: Tree,
    outside: Callable[..., str],
    alice: Any,
    alice_api: APIClient,
    layout: Callable[[Tree, str], tuple[str, dict[str, str]]],
) -> None:
    """Attack: the same escape in the shapes a resolver can get wrong: a relative link that
    climbs out with `..`; a link to a link that leads out; `<grant>/s -> s2/..` where s2 leads
    out (applying `..` to the text, or asking SFTP realpath, which Incus answers without
    following links, says it stays in the grant); a link in a middle component (the
    destination's own parent is a real directory); the granted directory itself, or a directory
    above it, replaced by a link; create_dirs below a link that leads out. `out` is a fresh
    directory under /etc, and nothing in it may change."""
    grant(alice, tree.granted)
    out = outside("/etc")
    run_in(RUNNING, "mkdir", out)
    path, headers = layout(tree, out)
    before = everything_in(out)

    task = pushed(accepted(alice_api, path, **headers))

    assert everything_in(out) == before, f"escaped the grant into {out}"
    assert_refused_outside(task)


# --- links at the destination --------------------------------------------------------------


def test_symlink_at_the_destination_leaves_its_target_untouched(
    tree: Tree, outside: Callable[..., str], alice: Any, alice_api: APIClient
) -> None:
    """Attack: <grant>/dest-link -> /etc/<name>, a root file of mode 0600. Alice uploads
    <grant>/dest-link with mode 0666; the push would replace the link's target and give it the
    requested mode. The target keeps its content and mode, the link stays a link."""
    grant(alice, tree.granted)
    target = outside("/etc")
    name = posixpath.basename(target)
    run_in(RUNNING, "sh", "-c", 'echo original > "$1" && chmod 600 "$1"', "sh", target)
    link = f"{tree.granted}/dest-link"
    symlink_in(RUNNING, link, target)

    task = pushed(accepted(alice_api, link, x_file_mode="0666"))

    assert run_in(RUNNING, "cat", target) == "original\n", f"escaped the grant: {target} replaced"
    assert stat_in(RUNNING, target)[:3] == ("600", 0, 0)
    assert named("/etc", name) == [name]
    assert readlink_in(RUNNING, link) == target
    assert entries_in(RUNNING, tree.granted) == ["dest-link"]
    assert_refused_outside(task, link, target)


def test_dangling_symlink_at_the_destination_creates_nothing(
    tree: Tree, outside: Callable[..., str], alice: Any, alice_api: APIClient
) -> None:
    """Attack: <grant>/profile -> /root/<name>, which does not exist (think /root/.profile).
    Alice uploads <grant>/profile; the push would create the link's target, root's own file.
    Nothing may appear in /root and the link stays dangling."""
    grant(alice, tree.granted)
    target = outside("/root")
    name = posixpath.basename(target)
    link = f"{tree.granted}/profile"
    symlink_in(RUNNING, link, target)

    task = pushed(accepted(alice_api, link))

    assert_absent(target)
    assert named("/root", name) == []
    assert readlink_in(RUNNING, link) == target
    assert entries_in(RUNNING, tree.granted) == ["profile"]
    assert_refused_outside(task, link, target)


# --- links that appear later ---------------------------------------------------------------


def test_symlink_planted_after_acceptance_is_refused_when_retried(
    tree: Tree, outside: Callable[..., str], alice: Any, alice_api: APIClient
) -> None:
    """Interleaving: alice uploads <grant>/late/<name> while late does not exist; the push fails
    (missing parent). Then `ln -s /etc <grant>/late` happens in the instance and alice retries
    through the API. The grant was checked on the string when the upload was accepted; the
    retry's push must check the instance again and refuse, writing nothing in /etc."""
    grant(alice, tree.granted)
    target = outside("/etc")
    name = posixpath.basename(target)
    late = f"{tree.granted}/late"

    task = pushed(accepted(alice_api, f"{late}/{name}"))
    assert task.status == Status.FAILED and task.attempts == 1
    assert "does not exist" in task.last_error

    symlink_in(RUNNING, late, "/etc")
    assert alice_api.post(f"/api/uploads/{task.pk}/retry/").status_code == 200
    task = pushed(task)

    assert_absent(target)
    assert named("/etc", name) == []
    assert_refused_outside(task, late, attempts=2)


def test_unprivileged_process_in_the_instance_cannot_chain_a_root_file(
    tree: Tree, outside: Callable[..., str], alice: Any, alice_api: APIClient
) -> None:
    """Chain: alice (owners 1000:1000) makes <grant>/u1000/ owned by 1000 with create_dirs; a
    process of uid 1000 in the instance then links <grant>/u1000/r -> /root; alice uploads
    <grant>/u1000/r/<name>.sh with mode 0700, which would be /root/<name>.sh, root-owned. The
    push is refused; asked with uid 0, the upload is refused at once (0 is not her owner). No
    root-owned file appears, in /root or in the tree."""
    grant(alice, tree.granted, owners=["1000:1000"])
    seed = pushed(
        accepted(
            alice_api,
            f"{tree.granted}/u1000/seed.txt",
            x_create_dirs="true",
            x_file_uid="1000",
            x_file_gid="1000",
        )
    )
    assert seed.status == Status.SUCCEEDED, seed.last_error
    assert stat_in(RUNNING, f"{tree.granted}/u1000")[:3] == ("755", 1000, 1000)
    symlink_in(RUNNING, f"{tree.granted}/u1000/r", "/root", uid=1000)
    target = outside("/root", ".sh")
    name = posixpath.basename(target)
    path = f"{tree.granted}/u1000/r/{name}"

    task = pushed(accepted(alice_api, path, x_file_mode="0700"))

    assert_absent(target)
    assert named("/root", name) == []
    assert_refused_outside(task, f"{tree.granted}/u1000/r")

    as_root = send(alice_api, path, x_file_mode="0700", x_file_uid="0", x_file_gid="0")
    run_worker()
    assert_absent(target)
    assert as_root.status_code == 403, as_root.content
    root_files = run_in(RUNNING, "busybox", "find", tree.root, "-user", "0", "-type", "f")
    assert root_files == ""


# --- create_dirs and the granted directory itself ------------------------------------------


@pytest.mark.parametrize("existing", ["", "/opt/carol"], ids=["nothing", "parent"])
@pytest.mark.parametrize("owner", [None, "1000:1000"], ids=["no-owner", "owner-1000"])
def test_create_dirs_creates_nothing_at_or_above_the_granted_directory(
    tree: Tree, alice: Any, alice_api: APIClient, existing: str, owner: str | None
) -> None:
    """Attack: the grant is <root>/opt/carol/data, which the instance does not have (nor, in the
    first case, <root>/opt). An upload below it with create_dirs (and uid/gid 1000, allowed by
    the grant) would create <root>/opt and <root>/opt/carol owned as requested: directories
    above the grant, where uid 1000 could then plant links. create_dirs only creates below the
    granted directory: the task fails for good naming it, nothing above is created or
    re-owned."""
    granted = f"{tree.root}/opt/carol/data"
    if existing:
        run_in(RUNNING, "mkdir", "-p", f"{tree.root}{existing}")
    headers = {"x_create_dirs": "true"}
    if owner is None:
        grant(alice, granted)
    else:
        grant(alice, granted, owners=[owner])
        headers.update(x_file_uid="1000", x_file_gid="1000")

    task = pushed(accepted(alice_api, f"{granted}/x/file.txt", **headers))

    assert_absent(granted if existing else f"{tree.root}/opt")
    if existing:
        assert stat_in(RUNNING, f"{tree.root}/opt/carol")[:3] == ("755", 0, 0)
    assert task.status == Status.FAILED and task.attempts == 1, task.last_error
    assert granted in task.last_error


@pytest.mark.parametrize("spelling", ["{p}", "{p}/.", "{p}/x/.."])
def test_path_equal_to_the_granted_directory_writes_nothing(
    tree: Tree, alice: Any, alice_api: APIClient, spool: Path, spelling: str
) -> None:
    """Attack: the grant is <root>/srv/bob, a directory the instance does not have yet. An upload
    to <root>/srv/bob (or /srv/bob/., or /srv/bob/x/..) passes a prefix check and would create a
    *file* named like the granted directory. Refused with 403 before anything is queued."""
    granted = f"{tree.root}/srv/bob"
    grant(alice, granted)

    response = send(alice_api, spelling.format(p=granted))
    run_worker()

    assert_absent(granted)
    assert response.status_code == 403, response.content
    assert "detail" in response.json()
    assert UploadTask.objects.count() == 0
    assert spool_files(spool) == []


def test_owners_limit_what_lands(tree: Tree, alice: Any, alice_api: APIClient, spool: Path) -> None:
    """Attack: any grant holder could ask for any uid/gid, 0 included, and get files owned by
    root or by another user of the instance. With owners 1000:1000, other owners are refused
    with 403 before anything is queued; 1000:1000 lands as asked; without uid/gid a new file is
    root's, as with `incus file push`."""
    grant(alice, tree.granted, owners=["1000:1000"])
    for uid, gid in (("0", "0"), ("1000", "0"), ("0", "1000"), ("1001", "1001")):
        path = f"{tree.granted}/owned-{uid}-{gid}.txt"
        response = send(alice_api, path, x_file_uid=uid, x_file_gid=gid)
        run_worker()
        assert not exists_in(RUNNING, path), f"{path} landed owned by {uid}:{gid}"
        assert response.status_code == 403, (uid, gid, response.content)
        assert "1000:1000" in response.json()["detail"]
    assert UploadTask.objects.count() == 0 and spool_files(spool) == []

    mine = pushed(
        accepted(alice_api, f"{tree.granted}/mine.txt", x_file_uid="1000", x_file_gid="1000")
    )
    plain = pushed(accepted(alice_api, f"{tree.granted}/plain.txt"))
    assert (mine.status, plain.status) == (Status.SUCCEEDED, Status.SUCCEEDED)
    assert stat_in(RUNNING, f"{tree.granted}/mine.txt")[1:3] == (1000, 1000)
    assert stat_in(RUNNING, f"{tree.granted}/plain.txt")[:3] == ("644", 0, 0)


# --- what keeps working --------------------------------------------------------------------


def test_links_that_stay_inside_the_grant_still_work(
    tree: Tree, alice: Any, alice_api: APIClient
) -> None:
    """A relative parent link (<grant>/current -> releases/1) and an absolute destination link
    inside the grant (<grant>/config.yml -> <grant>/releases/1/config.yml) lead nowhere
    outside: each file lands where its link leads, and the links stay links."""
    grant(alice, tree.granted)
    release = f"{tree.granted}/releases/1"
    run_in(RUNNING, "mkdir", "-p", release)
    run_in(RUNNING, "sh", "-c", 'echo old > "$1"', "sh", f"{release}/config.yml")
    symlink_in(RUNNING, f"{tree.granted}/current", "releases/1")
    symlink_in(RUNNING, f"{tree.granted}/config.yml", f"{release}/config.yml")

    app = pushed(accepted(alice_api, f"{tree.granted}/current/app.txt", b"app\n"))
    config = pushed(accepted(alice_api, f"{tree.granted}/config.yml", b"new config\n"))

    assert app.status == Status.SUCCEEDED, app.last_error
    assert config.status == Status.SUCCEEDED, config.last_error
    assert run_in(RUNNING, "cat", f"{release}/app.txt") == "app\n"
    assert run_in(RUNNING, "cat", f"{release}/config.yml") == "new config\n"
    assert readlink_in(RUNNING, f"{tree.granted}/current") == "releases/1"
    assert readlink_in(RUNNING, f"{tree.granted}/config.yml") == f"{release}/config.yml"


def test_superuser_still_writes_through_links_to_anywhere(
    tree: Tree, outside: Callable[..., str], django_user_model: Any
) -> None:
    """A superuser needs no grant and pushes like `incus file push`: through a parent link to
    /etc and through a dangling destination link into /root."""
    root_user = django_user_model.objects.create_superuser("root", "r@example.com", "pw-root-123")
    api = token_client(root_user)
    in_etc = outside("/etc")
    in_root = outside("/root")
    symlink_in(RUNNING, f"{tree.root}/etc", "/etc")
    symlink_in(RUNNING, f"{tree.root}/dest", in_root)

    through_parent = pushed(accepted(api, f"{tree.root}/etc/{posixpath.basename(in_etc)}"))
    through_dest = pushed(accepted(api, f"{tree.root}/dest"))

    assert through_parent.status == Status.SUCCEEDED, through_parent.last_error
    assert through_dest.status == Status.SUCCEEDED, through_dest.last_error
    assert run_in(RUNNING, "cat", in_etc) == BODY.decode()
    assert run_in(RUNNING, "cat", in_root) == BODY.decode()
    assert readlink_in(RUNNING, f"{tree.root}/dest") == in_root


def test_grant_without_prefixes_writes_through_links(
    tree: Tree, outside: Callable[..., str], alice: Any, alice_api: APIClient
) -> None:
    """A grant with no path prefixes covers the whole instance: wherever a link leads is inside
    it, so the file lands at the link's target."""
    grant(alice)
    target = outside("/etc")
    symlink_in(RUNNING, f"{tree.root}/dest", target)

    task = pushed(accepted(alice_api, f"{tree.root}/dest"))

    assert task.status == Status.SUCCEEDED, task.last_error
    assert run_in(RUNNING, "cat", target) == BODY.decode()


# --- the refusal ---------------------------------------------------------------------------


def test_a_refusal_is_permanent_and_audited(
    tree: Tree, outside: Callable[..., str], alice: Any, alice_api: APIClient
) -> None:
    """A push refused for leaving the grant is not a transient error: one attempt, failed at
    once (no backoff, a later worker run does not try again), the attempt recorded with the
    reason, a `push refused` audit event for the task, and the reason shown to alice."""
    grant(alice, tree.granted)
    target = outside("/etc")
    symlink_in(RUNNING, f"{tree.granted}/etc", "/etc")

    task = pushed(accepted(alice_api, f"{tree.granted}/etc/{posixpath.basename(target)}"))
    run_worker()
    task.refresh_from_db()

    assert_absent(target)
    assert_refused_outside(task, f"{tree.granted}/etc")
    attempts = list(UploadAttempt.objects.filter(task=task).values_list("outcome", "error"))
    assert attempts == [(Outcome.FAILED, task.last_error)]
    assert AuditEvent.objects.filter(action="push", outcome="refused", task_id=task.pk).count() == 1
    shown = alice_api.get(f"/api/uploads/{task.pk}/").json()
    assert (shown["status"], shown["last_error"]) == ("failed", task.last_error)


# --- a stopped instance --------------------------------------------------------------------


@pytest.fixture
def stopped_tree() -> Iterator[Tree]:
    """The same fresh tree in the stopped instance, made without starting it."""
    root = unique_dir()
    granted = f"{root}/srv/alice"
    incus("file", "create", "-p", "--type=directory", f"{STOPPED}{granted}")
    yield Tree(root=root, granted=granted)
    incus("file", "delete", "-f", f"{STOPPED}{root}")


def test_symlink_in_a_stopped_instance_is_refused_too(
    stopped_tree: Tree, alice: Any, alice_api: APIClient
) -> None:
    """Attack: the link is prepared in the stopped instance without starting it: `incus file
    create --type=symlink` makes <grant>/etc -> /etc there (`incus file push -r` of a local tree
    holding a link does too). The push into the stopped instance is refused like a running
    one's, nothing appears in its /etc, and it stays stopped."""
    granted = stopped_tree.granted
    grant(alice, granted, instance=STOPPED)
    name = unique_name()
    incus("file", "create", "--type=symlink", f"{STOPPED}{granted}/etc", "/etc")
    try:
        task = pushed(accepted(alice_api, f"{granted}/etc/{name}", container=STOPPED))
        assert_absent(f"/etc/{name}", STOPPED)
        assert_refused_outside(task, f"{granted}/etc")
        assert not is_running(STOPPED)
    finally:
        incus("file", "delete", f"{STOPPED}/etc/{name}", check=False)


# --- beyond the issue ----------------------------------------------------------------------


def test_a_link_into_another_granted_directory_does_not_lend_its_owners(
    tree: Tree, alice: Any, alice_api: APIClient
) -> None:
    """Attack: alice holds two grants in the instance: <grant> with owners 1000:1000 and
    <root>/srv/shared with any owner, and <root>/srv/shared/l -> <grant>. An upload to
    <root>/srv/shared/l/<file> with uid/gid 1001 passes the API on the string (shared allows any
    owner), and its resolved location is inside a granted directory, but not one whose grant
    allows 1001: the file must not land there owned by 1001."""
    shared = f"{tree.root}/srv/shared"
    run_in(RUNNING, "mkdir", shared)
    grant(alice, tree.granted, owners=["1000:1000"])
    grant(alice, shared, owners=["*"])
    symlink_in(RUNNING, f"{shared}/l", tree.granted)

    task = pushed(
        accepted(alice_api, f"{shared}/l/other.txt", x_file_uid="1001", x_file_gid="1001")
    )

    landed = f"{tree.granted}/other.txt"
    assert not exists_in(RUNNING, landed), f"{landed} landed owned by 1001:1001"
    assert task.status == Status.FAILED and task.attempts == 1, task.last_error


def test_owners_narrowed_while_the_upload_waited_are_checked_at_push_time(
    tree: Tree, alice: Any, alice_api: APIClient
) -> None:
    """Interleaving: alice uploads with uid/gid 1000 while her grant allows 1000:1000; before
    the push an administrator narrows the grant's owners to none. Like a revoked grant, the
    push is refused and nothing lands owned by 1000."""
    granted = grant(alice, tree.granted, owners=["1000:1000"])
    task = accepted(alice_api, f"{tree.granted}/f.txt", x_file_uid="1000", x_file_gid="1000")
    Grant.objects.filter(pk=granted.pk).update(owners=[])

    task = pushed(task)

    assert_absent(f"{tree.granted}/f.txt")
    assert task.status == Status.FAILED and task.attempts == 1, task.last_error
