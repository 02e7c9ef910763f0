"""The README works as written.

Its "Try it" commands are read from the README itself (the fenced blocks of that section) and
run as a newcomer runs them: in a fresh clone, `make run` in one terminal, the commands one
after another in a second terminal where nothing was exported, against the real Incus. A `sh`
block's commands must succeed; a `console` block's commands must print what it shows (ids and
times aside) and exit 0, or with the status a following `echo $?` shows.

The clone gets the checkout's uncommitted changes to tracked files, so what is about to be
committed is what is walked, and reuses the test run's virtualenv as its `.venv`. It runs in a
network namespace of its own, so the README's port 8000 is free whatever else runs here.
"""

import os
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.apps import apps

from tests.conftest import ROOT

README = ROOT / "README.md"
UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
# `ls -l`'s time column: "Dec  1 20:48", or the year for older files.
LS_TIME = re.compile(r"\b[A-Z][a-z]{2} +\d{1,2} +(\d\d:\d\d|\d{4})\b")


@dataclass
class Step:
    command: str
    shown: list[str] | None  # the output a `console` block shows; None in a `sh` block
    status: int = 0


def try_it_steps(readme: str) -> list[Step]:
    section = readme.split("\n## Try it\n", 1)[1].split("\n## ", 1)[0]
    steps: list[Step] = []
    for language, body in re.findall(r"^```(\w+)\n(.*?)^```$", section, re.M | re.S):
        assert language in ("sh", "console"), f"a ```{language} block in Try it"
        pending = ""
        for line in body.splitlines():
            if language == "console" and not pending and not line.startswith("$ "):
                shown = steps[-1].shown
                assert shown is not None
                shown.append(line)
                continue
            text = line[2:] if language == "console" and not pending else line
            pending += text
            if pending.endswith("\\"):
                pending += "\n"
                continue
            if pending.strip():
                steps.append(Step(pending, [] if language == "console" else None))
            pending = ""
    for before, step in zip(steps, steps[1:], strict=False):
        if step.command == "echo $?" and step.shown:
            before.status = int(step.shown[0])
    return steps


def normal(line: str) -> str:
    return " ".join(LS_TIME.sub("<time>", UUID.sub("<id>", line)).split())


SAMPLE = """\
# A README

## Try it

```sh
first --flag \\
  continued   # a comment
export X=$(second)
```

Prose with `inline code`.

```console
$ third
some output
$ fourth
$ echo $?
2
```

## Next

```sh
not part of it
```
"""


def test_try_it_steps_are_read_from_the_fenced_blocks_of_the_section() -> None:
    steps = try_it_steps(SAMPLE)
    assert steps == [
        Step("first --flag \\\n  continued   # a comment", None),
        Step("export X=$(second)", None),
        Step("third", ["some output"]),
        Step("fourth", [], status=2),
        Step("echo $?", ["2"]),
    ]


class Terminal:
    """A second terminal in `cwd`: commands one after another, each seeing what the ones
    before exported and `$?` of the one before. Standard input is a terminal (its controlling
    one), where prompts appear and get their answers; standard output and error are kept."""

    def __init__(self, cwd: Path, env: dict[str, str], enter: list[str], state: Path) -> None:
        self.cwd = cwd
        self.env = env
        self.enter = enter
        self.state = state
        self.status = 0

    def run(self, command: str, answers: dict[str, str] | None = None, timeout: float = 180) -> str:
        script = f'(exit {self.status})\n{command}\n__status=$?\nenv -0 > "{self.state}"\n'
        script += "exit $__status\n"
        controller, terminal = os.openpty()
        try:
            proc = subprocess.Popen(
                [*self.enter, "bash", "-c", script],
                cwd=self.cwd,
                env=self.env,
                stdin=terminal,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            os.close(terminal)
            assert proc.stdout is not None
            output, screen = b"", ""
            streams = [proc.stdout.fileno(), controller]
            deadline = time.monotonic() + timeout
            while proc.stdout.fileno() in streams:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError(f"{command!r} still runs after {timeout} s: {output!r}")
                for ready in select.select(streams, [], [], 0.2)[0]:
                    try:
                        chunk = os.read(ready, 65536)
                    except OSError:  # the terminal's last user is gone
                        chunk = b""
                    if not chunk:
                        streams.remove(ready)
                    elif ready == controller:
                        screen += chunk.decode(errors="replace")
                    else:
                        output += chunk
                for prompt, reply in (answers or {}).items():
                    if screen.endswith(prompt):
                        os.write(controller, f"{reply}\n".encode())
                        screen += "\n"
            self.status = proc.wait(timeout=30)
        finally:
            os.close(controller)
        if self.state.exists():
            exported = self.state.read_text().split("\0")
            self.env = dict(item.split("=", 1) for item in exported if item)
            self.state.unlink()
        return output.decode(errors="replace")


def newcomer_environment() -> dict[str, str]:
    """What a fresh terminal has: no DJANGO_*, UPLOADS_*, DATABASE_URL, and no virtualenv on
    the PATH."""
    path = [p for p in os.environ["PATH"].split(":") if not p.startswith(sys.prefix)]
    return {
        "PATH": ":".join(path),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
    }


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    path = tmp_path / "uploadsvc"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(path)], check=True, timeout=120)
    changes = subprocess.run(
        ["git", "diff", "HEAD", "--binary"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    if changes:
        subprocess.run(["git", "apply"], cwd=path, input=changes, check=True)
    (path / ".venv").symlink_to(sys.prefix)
    return path


@pytest.fixture
def namespace() -> Iterator[list[str]]:
    """A network namespace of its own with only a loopback: the prefix that runs a command in
    it."""
    if os.geteuid() != 0:
        message = "walks the README in a network namespace of its own: run the tests as root"
        if os.environ.get("REQUIRE_INCUS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    holder = subprocess.Popen(
        ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep 3600"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "up"
        yield ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]
    finally:
        holder.kill()
        holder.wait()


def wait_for_the_server(enter: list[str], make: subprocess.Popen[bytes], log: Path) -> None:
    probe = "import socket; socket.create_connection(('127.0.0.1', 8000), 1).close()"
    deadline = time.monotonic() + 180
    while subprocess.run(
        [*enter, "python3", "-c", probe], capture_output=True, check=False
    ).returncode:
        if make.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"make run did not serve port 8000:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.mark.incus
def test_try_it_works_as_written_in_a_fresh_clone(
    incus: str, clone: Path, namespace: list[str], tmp_path: Path
) -> None:
    steps = try_it_steps((clone / "README.md").read_text())
    assert len(steps) > 5
    env = newcomer_environment()
    log = tmp_path / "make-run.log"
    with open(log, "wb") as out:
        # `make run` as the first terminal runs it; the virtualenv is the test run's own.
        make = subprocess.Popen(
            [*namespace, "make", "--no-print-directory", "-o", ".venv/.installed-stamp", "run"],
            cwd=clone,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_the_server(namespace, make, log)
        terminal = Terminal(clone, env, namespace, tmp_path / "exported")
        password = secrets.token_urlsafe(16)
        answers = {"Password: ": password, "Password (again): ": password}
        for step in steps:
            output = terminal.run(step.command, answers)
            context = f"$ {step.command}\n{output}\n-- make run:\n{log.read_text()[-2000:]}"
            if step.command != "echo $?":
                assert terminal.status == step.status, context
            if step.shown is not None:
                assert [normal(line) for line in output.splitlines()] == [
                    normal(line) for line in step.shown
                ], context
        assert len(terminal.env.get("UPLOADSVC_TOKEN", "")) == 40
    finally:
        # As Ctrl-C does: make passes the signal on, waits for scripts/run, and dies of it.
        make.send_signal(signal.SIGTERM)
        make.wait(timeout=90)
    served = log.read_text()
    assert make.returncode == -signal.SIGTERM, served[-3000:]
    assert "Traceback" not in served and "stopped after" in served, served[-3000:]


def test_the_layout_names_every_module_model_and_command() -> None:
    readme = README.read_text()
    layout = readme[readme.index("\nLayout: ") :].split("\n\n", 1)[0]
    app = ROOT / "uploads"
    modules = [p.name for p in [*app.glob("*.py"), *(app / "cli").glob("*.py")]]
    modules += [p.name for p in (ROOT / "uploadsvc").glob("*.py")]
    named = {name for name in modules if name != "__init__.py"}
    commands = {p.stem for p in (app / "management" / "commands").glob("[!_]*.py")}
    models = {model.__name__ for model in apps.get_app_config("uploads").get_models()}
    missing = sorted(
        name
        for name in named | commands
        if f"`{name}`" not in layout and f"`{name.removesuffix('.py')}`" not in layout
    )
    missing += sorted(model for model in models if not re.search(rf"\b{model}\b", layout))
    assert missing == []
