"""The check behind the `incus` fixture: what the Incus tests need from the daemon, and one
reason naming `make incus` when something is missing (a skip, or a failure in CI)."""

from pathlib import Path

import pytest

from tests.conftest import incus_unavailable
from tests.incus_utils import P2_PROJECT, RUNNING, environment_problems, unique_name

pytestmark = pytest.mark.incus


def test_the_environment_make_incus_sets_up_is_complete(incus: str) -> None:
    assert environment_problems() == []


def test_each_missing_piece_is_named(incus: str, tmp_path: Path) -> None:
    image, project, instance = unique_name("uploadsvc-no"), unique_name("no"), unique_name("no")
    problems = environment_problems(
        image=image,
        instances={
            ("default", RUNNING): "Stopped",
            ("default", instance): "Running",
            (project, "web1"): "Running",
            (P2_PROJECT, instance): "Running",
        },
        https_address="127.0.0.1:1",
        client_dir=tmp_path,
    )
    # Each with Incus's own words after it, in parentheses, when Incus said no.
    assert [problem.split(" (")[0] for problem in problems] == [
        f"no image {image}",
        f"no project {project}",
        f"{RUNNING} in project default is Running, not Stopped",
        f"no instance {instance} in project default",
        f"no instance web1 in project {project}",
        f"no instance {instance} in project {P2_PROJECT}",
        "Incus does not listen on https://127.0.0.1:1",
        f"no {tmp_path}/client.crt",
        f"no {tmp_path}/client.key",
        f"no {tmp_path}/server.crt",
    ]
    assert problems[0].endswith("(Image alias not found)")
    assert problems[4].endswith("Project not found)")


def test_a_missing_environment_skips_with_the_way_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("REQUIRE_INCUS", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        incus_unavailable("Incus answers, but the test environment is incomplete: no image x")
    assert str(skipped.value) == (
        "Incus answers, but the test environment is incomplete: no image x. "
        "Run `make incus` as root to set it up"
    )


def test_in_ci_the_same_reason_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUIRE_INCUS", "1")
    with pytest.raises(pytest.fail.Exception) as failed:
        incus_unavailable("no Incus reachable (refused)")
    assert str(failed.value) == (
        "no Incus reachable (refused). Run `make incus` as root to set it up"
    )
