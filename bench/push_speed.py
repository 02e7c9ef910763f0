"""Push speed: IncusPusher against `incus file push`, same file, same machine, same run.

    .venv/bin/python bench/push_speed.py [--size-mib 1024] [--runs 3] [--small 2000]

Pushes a file of random bytes into a running instance with the pusher and with the CLI,
alternating, `sync` before each run so that neither pays for the other's writeback; reports
each run, the medians, and the peak RSS of this process (the pusher runs in it; the figure
before the first push is what Django and the libraries take) and of the CLI. Then small
files over one kept SFTP session, and with a new session per file.
Needs a local Incus with the test instances (`sudo make incus`).
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "uploadsvc.settings")
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-not-secret")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import django  # noqa: E402

django.setup()

from django.test import override_settings  # noqa: E402

from uploads.incus import IncusPusher  # noqa: E402
from uploads.pushers import PushRequest  # noqa: E402

GNU_TIME = "/usr/bin/time"


def incus(*args: str) -> None:
    subprocess.run(["incus", *args], check=True, capture_output=True, timeout=600)


def incus_peak_rss(*args: str) -> float | None:
    """Run the incus CLI; its peak RSS in MiB when GNU time is there to measure it (the
    children's figure from getrusage would count the pre-exec copy of this process)."""
    if not Path(GNU_TIME).exists():
        incus(*args)
        return None
    done = subprocess.run(
        [GNU_TIME, "-f", "%M", "incus", *args], check=True, capture_output=True, timeout=600
    )
    return int(done.stderr.decode().split()[-1]) / 1024


def make_source(directory: Path, size: int) -> Path:
    path = directory / "source.bin"
    with path.open("wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            out.write(chunk)
            left -= len(chunk)
    return path


def rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def big_file(instance: str, source: Path, size: int, runs: int, workdir: str) -> None:
    baseline = rss_mib(resource.RUSAGE_SELF)
    print(f"peak RSS before pushing (Django, pylxd, paramiko loaded): {baseline:.0f} MiB")
    pusher = IncusPusher()
    ours: list[float] = []
    cli: list[float] = []
    cli_rss: list[float] = []
    try:
        for n in range(runs):
            for name, times in (("pusher", ours), ("cli", cli)):
                path = f"{workdir}/{name}-{n}.bin"
                os.sync()
                started = time.monotonic()
                if name == "pusher":
                    request = PushRequest(
                        open_source=partial(open, source, "rb"),
                        size=size,
                        instance=instance,
                        project="default",
                        path=path,
                    )
                    pusher.push(request)
                else:
                    rss = incus_peak_rss(
                        "file", "push", "--quiet", str(source), f"{instance}{path}"
                    )
                    if rss is not None:
                        cli_rss.append(rss)
                times.append(time.monotonic() - started)
                rate = size / times[-1] / 2**20
                print(f"run {n + 1} {name:6} {times[-1]:6.2f} s {rate:7.1f} MiB/s")
                incus("exec", instance, "--", "rm", "-f", path)
    finally:
        pusher.close()
    print(
        f"{size / 2**20:.0f} MiB, median of {runs}: pusher {statistics.median(ours):.2f} s, "
        f"incus file push {statistics.median(cli):.2f} s"
    )
    cli_peak = f"{max(cli_rss):.0f} MiB" if cli_rss else f"unknown (no {GNU_TIME})"
    print(
        f"peak RSS: this process (pusher) {rss_mib(resource.RUSAGE_SELF):.0f} MiB, "
        f"incus file push {cli_peak}"
    )


def small_files(instance: str, directory: Path, count: int, workdir: str) -> None:
    source = directory / "small.bin"
    source.write_bytes(os.urandom(1024))
    for label, idle in (("one kept session", 1.0), ("a new session per file", 0)):
        with override_settings(UPLOADS={"SFTP_IDLE_SECONDS": idle}):
            pusher = IncusPusher()
            try:
                started = time.monotonic()
                for n in range(count):
                    pusher.push(
                        PushRequest(
                            open_source=partial(open, source, "rb"),
                            size=1024,
                            instance=instance,
                            project="default",
                            path=f"{workdir}/small-{n % 100}.bin",
                        )
                    )
                elapsed = time.monotonic() - started
            finally:
                pusher.close()
        print(f"1 KiB files, {label}: {count / elapsed:.0f}/s ({count} in {elapsed:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instance", default="uploadsvc-run")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small", type=int, default=2000, help="small files to push (0: skip)")
    args = parser.parse_args()
    workdir = f"/tmp/uploadsvc-bench-{uuid.uuid4().hex[:8]}"
    incus("exec", args.instance, "--", "mkdir", "-p", workdir)
    try:
        with tempfile.TemporaryDirectory(prefix="uploadsvc-bench-") as tmp:
            size = args.size_mib * 2**20
            source = make_source(Path(tmp), size)
            if args.runs:
                big_file(args.instance, source, size, args.runs, workdir)
            if args.small:
                small_files(args.instance, Path(tmp), args.small, workdir)
    finally:
        incus("exec", args.instance, "--", "rm", "-rf", workdir)


if __name__ == "__main__":
    main()
