"""The `uploadsvc` command: argument parsing, the commands, what they print, their exit status.

Exit status: 0 when everything asked for succeeded (or, without --wait, was accepted); 1 when a
push failed, was refused or timed out, or a request failed; 2 for usage errors.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from uploads.cli import sources
from uploads.cli.client import FINISHED, ApiError, Client, Task, client_version
from uploads.cli.progress import Progress
from uploads.cli.sources import Source, SourceError, Target, UsageError

DEFAULT_URL = "http://127.0.0.1:8000"
STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")

TOP_DESCRIPTION = """\
Description:
  Push files into Incus instances through uploadsvc: each file is uploaded over HTTP, accepted
  at once, and delivered into the instance by the service's workers, with retries.

Commands:
  push     Push files into instances
  status   Show an upload
  ls       List your uploads
  retry    Retry a failed or cancelled upload
  cancel   Cancel a pending upload

Run "uploadsvc <command> --help" for a command's flags."""

TOP_EPILOG = """\
Environment:
  UPLOADSVC_URL     the service (default http://127.0.0.1:8000); --url overrides it
  UPLOADSVC_TOKEN   your API token; --token overrides it (but shows in `ps`)

Exit status:
  0  everything succeeded (push without --wait: every file was accepted)
  1  a push failed, was refused or timed out, or the service could not be reached
  2  usage error"""

PUSH_DESCRIPTION = """\
Description:
  Push files into instances, as `incus file push` does, through the service.

  A target ending in "/", several sources or -r make the target a directory: each file keeps
  its name under it (its path relative to the source under -r). "-" reads standard input (the
  only source; name the file in the target).

  Several instances get the same file from one upload: name them with commas in the target
  (web1,web2/etc/app.conf), give a glob ('web-*/etc/app.conf', matched on the server against
  the instances you may write to), or give several -t targets that differ only in the
  instance. The file is sent once; the service delivers it to each instance as a task of its
  own, and --wait waits for all of them.

  Each file is hashed and streamed (Repr-Digest lets the server refuse a corrupted body), and
  resent with the same Idempotency-Key after a dropped connection or a 503, so it is queued
  once. Standard input and pipes are first copied to a temporary file (in $TMPDIR): that gives
  the upload a length and a digest, and lets it be resent.

  Like `incus file push`, a file keeps its local permission bits unless --mode is given. Unlike
  it, the local owner is not copied (it means nothing inside the instance): a new file belongs
  to root, an overwritten one keeps its owner, unless --uid/--gid say otherwise. Only regular
  files are pushed: -r refuses symbolic links and does not create empty directories; -p makes
  missing parent directories (0755, owned like the file)."""

PUSH_EPILOG = """\
Examples:
  uploadsvc push /etc/hosts foo/etc/hosts
     To push /etc/hosts into the instance "foo".
  uploadsvc push --wait -p --mode 0640 --uid 1000 app.conf web1/srv/app/
     To push app.conf as /srv/app/app.conf and wait until it has landed.
  uploadsvc push -r -p --wait build/ web1/srv/
     To push the tree build/ as /srv/build/… .
  make-config | uploadsvc push --wait - web1/etc/app.conf
     To push standard input.
  uploadsvc push --wait app.conf 'web-*/etc/app.conf'
     To push app.conf once and have it delivered to every instance named web-….
  uploadsvc push --wait app.conf -t web1/etc/app.conf -t web2/etc/app.conf
     The same for two instances (web1,web2/etc/app.conf says it too).

With --wait the exit status is 0 only when every file landed; a failure prints the instance,
the path and the reason, e.g. "instance 'web1' not found in project 'default'"."""


def _octal_mode(text: str) -> int:
    value = text.strip().lower().removeprefix("0o")
    if not value or len(value) > 4 or any(c not in "01234567" for c in value):
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode such as 0644")
    return int(value, 8)


def _id_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 4294967295")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("the timeout must be more than 0 seconds")
    return value


def _task_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an upload id") from None


def _connection_flags(defaults: bool) -> argparse.ArgumentParser:
    """--url and --token, accepted before the command and after it."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parser.add_argument_group("Global flags")
    group.add_argument("-h", "--help", action="help", help="Print help")
    default: Any = None if defaults else argparse.SUPPRESS
    group.add_argument(
        "--url", default=default, help=f"The service (default $UPLOADSVC_URL or {DEFAULT_URL})"
    )
    group.add_argument("--token", default=default, help="Your API token (default $UPLOADSVC_TOKEN)")
    return parser


def _command_parser(
    name: str, usage: str, description: str, epilog: str = ""
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"uploadsvc {name}",
        usage=f"uploadsvc {name} {usage}",
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_connection_flags(defaults=False)],
        allow_abbrev=False,
        add_help=False,
    )
    parser._optionals.title = "Flags"
    return parser


def _wait_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--wait", action="store_true", help=f"Wait until {what}")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="With --wait, give up after this long (exit 1); implies --wait",
    )


def _json_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"Print {what} as JSON")


def push_parser() -> argparse.ArgumentParser:
    parser = _command_parser(
        "push",
        "[flags] <source path>... [<remote>:]<instance>[,<instance>...]/<path>",
        PUSH_DESCRIPTION,
        PUSH_EPILOG,
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument(
        "-t",
        "--target",
        action="append",
        metavar="TARGET",
        help="An <instance>/<path> to push to (repeatable; the paths must be the same): every "
        "argument is then a source",
    )
    parser.add_argument(
        "-p", "--create-dirs", action="store_true", help="Create any directories necessary"
    )
    parser.add_argument("-r", "--recursive", action="store_true", help="Recursively push files")
    parser.add_argument(
        "--mode", type=_octal_mode, help="Set the file's perms on push (default: the local ones)"
    )
    parser.add_argument("--uid", type=_id_number, help="Set the file's uid on push")
    parser.add_argument("--gid", type=_id_number, help="Set the file's gid on push")
    parser.add_argument("--project", help="Incus project of the instance (default: default)")
    parser.add_argument("--remote", help="Incus remote, as configured on the service")
    _wait_flags(parser, "every file has landed (or failed)")
    _json_flag(parser, "the tasks")
    return parser


def status_parser() -> argparse.ArgumentParser:
    parser = _command_parser("status", "[flags] <id>", "Description:\n  Show an upload")
    parser.add_argument("id", type=_task_id, metavar="ID", help=argparse.SUPPRESS)
    _wait_flags(parser, "the upload has finished")
    _json_flag(parser, "the task")
    return parser


def ls_parser() -> argparse.ArgumentParser:
    parser = _command_parser("ls", "[flags]", "Description:\n  List your uploads, newest first")
    parser.add_argument("--status", choices=STATUSES, help="Only uploads in this state")
    parser.add_argument("--container", metavar="INSTANCE", help="Only uploads to this instance")
    _json_flag(parser, "the tasks")
    return parser


def action_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = _command_parser(name, "[flags] <id>", f"Description:\n  {description}")
    parser.add_argument("id", type=_task_id, metavar="ID", help=argparse.SUPPRESS)
    _json_flag(parser, "the task")
    return parser


def top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uploadsvc",
        usage="uploadsvc [--url URL] [--token TOKEN] <command> [flags] [args]",
        description=TOP_DESCRIPTION,
        epilog=TOP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_connection_flags(defaults=True)],
        allow_abbrev=False,
        add_help=False,
    )
    parser._optionals.title = "Flags"
    parser.add_argument(
        "--version",
        action="version",
        version=f"uploadsvc {client_version()}",
        help="Print version number",
    )
    parser.add_argument(
        "command", choices=list(COMMANDS), metavar="<command>", help=argparse.SUPPRESS
    )
    # Everything after the command is the command's: its own parser reads it, with options and
    # sources in any order (`push a.txt --wait b.txt web1/srv/`).
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


class Output:
    """Results on standard output, diagnostics on standard error, neither breaking the
    progress line."""

    def __init__(self, stdout: TextIO, stderr: TextIO, progress: Progress) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.progress = progress

    def line(self, text: str) -> None:
        self.progress.clear()
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def error(self, text: str) -> None:
        self.progress.clear()
        self.stderr.write(f"uploadsvc: {text}\n")
        self.stderr.flush()

    def json(self, data: Any) -> None:
        self.progress.clear()
        json.dump(data, self.stdout, indent=2)
        self.stdout.write("\n")
        self.stdout.flush()


def destination(task: Task) -> str:
    """`web1/etc/app.conf` as `incus file push` names it, with the remote and the project
    when they are not the defaults."""
    return _destination(task["remote"], task["project"], task["container"], task["path"])


def _destination(remote: str | None, project: str | None, instance: str, path: str) -> str:
    text = f"{instance}{path}"
    if remote and remote != "local":
        text = f"{remote}:{text}"
    if project and project != "default":
        text += f" (project {project})"
    return text


def tasks_of(accepted: Task) -> list[Task]:
    """The tasks of what an upload answered: a task, or a batch (a fan-out) with its tasks."""
    tasks: list[Task] = accepted.get("tasks", [accepted])
    return tasks


def is_batch(accepted: Task) -> bool:
    return "tasks" in accepted


def task_line(task: Task) -> str:
    return f"{task['id']}  {destination(task)}  {task['status']}"


def report_reason(out: Output, task: Task) -> None:
    """Why a finished task did not land, on standard error."""
    if task["status"] == "failed":
        out.error(f"push to {destination(task)} failed: {task['last_error']}")
    elif task["status"] == "cancelled":
        out.error(f"push to {destination(task)} was cancelled")


def describe_pending(task: Task) -> str:
    details = [f"attempt {task['attempts']} of {task['max_attempts']}"]
    if task.get("last_error"):
        details.append(f"last error: {task['last_error']}")
    return f"{task_line(task)} ({'; '.join(details)})"


def wait_all(
    client: Client, out: Output, accepted: list[Task], timeout: float | None, *, lines: bool
) -> tuple[list[Task], bool]:
    """Wait for every upload in turn (a task, or a batch and all its tasks) within one
    deadline: the final tasks and batches, and whether every task succeeded. With `lines`,
    prints each task's line as it finishes; the reasons for failures and what is still
    unfinished at the deadline go to standard error."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def show(task: Task) -> None:
        state = "landed" if task["status"] == "succeeded" else task["status"]
        out.progress.show(f"Waiting for {destination(task)}: {state}")

    def show_batch(batch: Task) -> None:
        done = sum(1 for task in batch["tasks"] if task["status"] in FINISHED)
        out.progress.show(f"Waiting for {batch['count']} instances: {done} finished")

    final: list[Task] = []
    for item in accepted:
        out_of_time = deadline is not None and time.monotonic() >= deadline
        if is_batch(item):
            if out_of_time:
                item = client.batch(item["id"])  # its state now, without waiting
            else:
                item = client.wait_batch(item["id"], deadline, on_update=show_batch)
        elif out_of_time:
            item = client.task(item["id"])
        else:
            item = client.wait(item["id"], deadline, on_update=show)
        final.append(item)
        for task in tasks_of(item):
            if task["status"] in FINISHED:
                if lines:
                    out.line(task_line(task))
                report_reason(out, task)
    tasks = [task for item in final for task in tasks_of(item)]
    unfinished = [t for t in tasks if t["status"] not in FINISHED]
    if unfinished:
        out.error(
            f"timed out after {timeout:g}s waiting for {len(unfinished)} of {len(tasks)} "
            "upload(s), still unfinished:"
        )
        for task in unfinished:
            out.stderr.write(f"  {describe_pending(task)}\n")
    return final, all(t["status"] == "succeeded" for t in tasks)


def _resolve_remote(args: argparse.Namespace, target: Target) -> str | None:
    if target.remote and args.remote and target.remote != args.remote:
        raise UsageError(
            f"the target names remote {target.remote!r} but --remote says {args.remote!r}"
        )
    remote: str | None = target.remote or args.remote
    return remote


class Push:
    """One `uploadsvc push`: every planned file uploaded in turn, each with its own
    Idempotency-Key (kept across the resends of that file)."""

    def __init__(
        self, client: Client, out: Output, args: argparse.Namespace, target: Target
    ) -> None:
        self.client = client
        self.out = out
        self.args = args
        self.target = target
        self.remote = _resolve_remote(args, target)
        self.wait = args.wait or args.timeout is not None
        self.run_id = uuid.uuid4().hex

    def where(self, source: Source) -> str:
        return _destination(self.remote, self.args.project, self.target.instance, source.path)

    def fields(self, source: Source) -> dict[str, str]:
        args = self.args
        fields = {"container": self.target.instance, "path": source.path}
        mode = args.mode if args.mode is not None else source.mode
        if mode is not None:
            fields["mode"] = f"{mode:04o}"
        if args.uid is not None:
            fields["uid"] = str(args.uid)
        if args.gid is not None:
            fields["gid"] = str(args.gid)
        if args.create_dirs:
            fields["create_dirs"] = "true"
        if args.project:
            fields["project"] = args.project
        if self.remote:
            fields["remote"] = self.remote
        return fields

    def upload(self, number: int, source: Source) -> Task:
        progress = self.out.progress
        label = source.label
        body = sources.prepare(source, lambda total: progress.transfer(f"Reading {label}", total))
        try:
            pushing = progress.transfer(f"Pushing {label} to {self.where(source)}", body.size)

            def attempt() -> Callable[[int], None]:
                pushing.restart()
                return pushing

            task = self.client.upload(
                self.fields(source),
                body,
                # The server keeps it for display; a multipart file part needs one.
                filename=source.display if source.display != "-" else "stdin",
                idempotency_key=f"uploadsvc-{self.run_id}-{number}",
                sent=attempt,
            )
        finally:
            body.release()
        state = "waiting" if self.wait else "accepted"
        progress.show(f"Pushing {label} to {self.where(source)}: {state}")
        return task


def _targets(args: argparse.Namespace) -> tuple[list[str], Target]:
    """The sources, and the target: the last argument, or every -t (the same path in several
    instances, pushed as one upload)."""
    if not args.target:
        if len(args.paths) < 2:
            raise UsageError("push needs a source and a target: <source path>... <instance>/<path>")
        return args.paths[:-1], sources.parse_target(args.paths[-1])
    if not args.paths:
        raise UsageError("push needs a source: <source path>... -t <instance>/<path>")
    targets = [sources.parse_target(text) for text in args.target]
    first = targets[0]
    for other in targets[1:]:
        if (other.path, other.is_dir, other.remote) != (first.path, first.is_dir, first.remote):
            raise UsageError(
                "the -t targets must differ only in the instance (one upload goes to the same "
                f"path in each): {first.path!r} and {other.path!r}"
            )
    instances = ",".join(dict.fromkeys(t.instance for t in targets))
    return args.paths, dataclasses.replace(first, instance=instances)


def run_push(args: argparse.Namespace, client: Client, out: Output) -> int:
    source_paths, target = _targets(args)
    push = Push(client, out, args, target)
    planned = sources.plan(source_paths, target, recursive=args.recursive, stdin=sys.stdin.buffer)
    accepted: list[Task] = []
    refused = 0
    try:
        for number, source in enumerate(planned, 1):
            try:
                task = push.upload(number, source)
            except ApiError as exc:
                refused += 1
                out.error(f"cannot push {source.label} to {push.where(source)}: {exc}")
                if exc.fatal:
                    break
                continue
            accepted.append(task)
            if not push.wait and not args.json:
                for each in tasks_of(task):
                    out.line(task_line(each))
        if not push.wait:
            if args.json:
                out.json(accepted)
            return 1 if refused else 0
        final, ok = wait_all(client, out, accepted, args.timeout, lines=not args.json)
    except KeyboardInterrupt:
        ids = ", ".join(t["id"] for item in accepted for t in tasks_of(item)) or "none"
        out.error(f"interrupted; the uploads accepted so far are still delivered: {ids}")
        return 130
    if args.json:
        out.json(final)
    return 1 if refused or not ok else 0


def run_status(args: argparse.Namespace, client: Client, out: Output) -> int:
    if args.wait or args.timeout is not None:
        final, ok = wait_all(client, out, [client.task(args.id)], args.timeout, lines=False)
        task = final[0]
    else:
        task, ok = client.task(args.id), True
    if args.json:
        out.json(task)
    else:
        out.line(status_text(task))
    return 0 if ok else 1


def status_text(task: Task) -> str:
    rows = [
        ("ID", task["id"]),
        ("Status", task["status"]),
        ("Destination", f"{task['container']}{task['path']}"),
        ("Project", task["project"]),
        ("Remote", task["remote"]),
        ("File", f"{task['filename'] or '-'} ({task['size']} bytes)"),
        ("SHA-256", task["sha256"]),
        ("Mode", task["mode"] or "(kept, or 0644 for a new file)"),
        ("Owner", f"{_owner(task['uid'])}:{_owner(task['gid'])}"),
        ("Create dirs", "yes" if task["create_dirs"] else "no"),
        ("Attempts", f"{task['attempts']} of {task['max_attempts']}"),
        ("Last error", task["last_error"] or "-"),
        ("Next attempt", task["next_attempt_at"] or "-"),
        ("Created", task["created_at"]),
        ("Started", task["started_at"] or "-"),
        ("Finished", task["finished_at"] or "-"),
    ]
    return "\n".join(f"{name}: {value}" for name, value in rows)


def _owner(value: int | None) -> str:
    return "(kept)" if value is None else str(value)


def run_ls(args: argparse.Namespace, client: Client, out: Output) -> int:
    tasks = list(client.tasks(status=args.status, container=args.container))
    if args.json:
        out.json(tasks)
        return 0
    rows = [("ID", "STATUS", "SIZE", "CREATED", "DESTINATION")]
    rows += [
        (t["id"], t["status"], str(t["size"]), t["created_at"][:19], destination(t)) for t in tasks
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        out.line("  ".join([*(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)), row[4]]))
    return 0


def run_retry(args: argparse.Namespace, client: Client, out: Output) -> int:
    return _print_task(args, out, client.retry(args.id))


def run_cancel(args: argparse.Namespace, client: Client, out: Output) -> int:
    return _print_task(args, out, client.cancel(args.id))


def _print_task(args: argparse.Namespace, out: Output, task: Task) -> int:
    if args.json:
        out.json(task)
    else:
        out.line(task_line(task))
    return 0


Command = Callable[[argparse.Namespace, Client, Output], int]

COMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Command]] = {
    "push": (push_parser, run_push),
    "status": (status_parser, run_status),
    "ls": (ls_parser, run_ls),
    "retry": (lambda: action_parser("retry", "Retry a failed or cancelled upload"), run_retry),
    "cancel": (lambda: action_parser("cancel", "Cancel a pending upload"), run_cancel),
}


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Options and sources in any order; after "--" only sources (`push -- -file web1/x`),
    which Python 3.11's parse_intermixed_args does not handle by itself."""
    if "--" not in argv or parser.prog != "uploadsvc push":
        return parser.parse_intermixed_args(argv)
    cut = argv.index("--")
    args = parser.parse_intermixed_args(argv[:cut])
    args.paths += argv[cut + 1 :]
    return args


def main() -> NoReturn:
    sys.exit(run(sys.argv[1:]))


def run(argv: Sequence[str]) -> int:
    options = top_parser().parse_args(argv)
    build, command = COMMANDS[options.command]
    parser = build()
    args = _parse(parser, options.args)
    url = getattr(args, "url", None) or options.url or os.environ.get("UPLOADSVC_URL")
    token = getattr(args, "token", None) or options.token or os.environ.get("UPLOADSVC_TOKEN")
    out = Output(sys.stdout, sys.stderr, Progress(sys.stderr))
    client = Client(url or DEFAULT_URL, token, notice=out.error)
    try:
        return command(args, client, out)
    except UsageError as exc:
        parser.error(str(exc))
    except (SourceError, ApiError) as exc:
        out.error(str(exc))
        return 1
    except KeyboardInterrupt:
        out.error("interrupted")
        return 130
    finally:
        out.progress.clear()
        client.close()
