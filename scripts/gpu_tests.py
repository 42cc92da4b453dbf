"""pytest with a time limit per test: a hung test costs that test alone, and a summary always
prints (scripts/gpu_check.sh, part 4). Needs nothing beyond pytest (no pytest-timeout).

    python scripts/gpu_tests.py --title "CUDA tests" --per-test 30 --deadline 80 --log OUT/tests.txt \\
        -- -q tests/test_cuda.py
    python scripts/gpu_tests.py --title "GPU tests" --marker cuda --exclude tests/test_cuda.py ... -- -q

pytest runs in a child process (its own session, so its children go with it) with this file as
a plugin (`-p gpu_tests`), which writes each test's start and outcome to a results file and arms
a timer per test: at the limit a SIGALRM raises TestTimedOut inside the test (a failure; the run
goes on), and a little later faulthandler writes every thread's stack, for a test stuck in C
code, where no Python signal handler runs. This supervisor reads the results as they come: a
test still running past its limit and a grace period is hung; it is sent SIGINT (pytest, if it
can, stops and prints its summary), then SIGKILL, recorded as hung, and pytest starts again on
the tests that have not run. A test during which pytest died (a crash) is recorded the same way.
At the deadline the run is stopped the same way and what is left is reported as not run. Then
one summary of all the runs is printed (and appended to the log): counts, and each failure,
error, hang and crash with its first line. Exit status 1 if any test did not pass or skip, or if
none ran at all (a selection that matches nothing is a mistake).

`--marker NAME`: run the tests marked NAME (`-m NAME`) in the test files that use the marker
(`pytest.mark.NAME`, or the `requires_NAME` decorator of tests/support/needs.py), so that only those
files are collected.
"""

from __future__ import annotations

import argparse
import faulthandler
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest

RESULTS_ENV = "FASTVIDEO_OFFLOAD_TEST_RESULTS"
LIMIT_ENV = "FASTVIDEO_OFFLOAD_TEST_LIMIT"
#: Seconds between the limit's SIGALRM and faulthandler's dump of a test that did not stop.
DUMP_AFTER = 2.0
#: Seconds a hung pytest is given to stop after SIGINT before it is killed: it ignored SIGALRM already.
HUNG_SIGINT_WAIT = 2.0


# ---- the plugin, inside pytest's process (active only when the supervisor set RESULTS_ENV) ----

class TestTimedOut(Exception):
    pass


def _record(**entry) -> None:
    with open(os.environ[RESULTS_ENV], "a") as f:
        f.write(json.dumps(entry) + "\n")


def pytest_collection_finish(session) -> None:
    if RESULTS_ENV in os.environ:
        _record(collected=[item.nodeid for item in session.items])


@pytest.hookimpl(hookwrapper=True)  # the old-style wrapper: any pytest the GPU machine may have
def pytest_runtest_protocol(item, nextitem):
    if RESULTS_ENV not in os.environ:
        yield
        return
    limit = float(os.environ[LIMIT_ENV])
    _record(start=item.nodeid)

    def expire(signum, frame):
        raise TestTimedOut(f"ran past its {limit:g} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    stacks = open(os.environ[RESULTS_ENV] + ".stacks", "a")
    faulthandler.dump_traceback_later(limit + DUMP_AFTER, exit=False, file=stacks)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        stacks.close()
        signal.signal(signal.SIGALRM, previous)
        _record(finish=item.nodeid)


def _first_line(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (file, line, reason)
        return str(longrepr[2])
    crash = getattr(longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(longrepr or "")
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def pytest_runtest_logreport(report) -> None:
    if RESULTS_ENV not in os.environ:
        return
    if report.when == "call" or report.outcome != "passed":
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        _record(nodeid=report.nodeid, outcome=outcome, message=_first_line(report), duration=report.duration)


# ---- the supervisor ----

#: The worse outcome of a test's phases wins (a pass whose teardown errs is an error).
RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3, "crashed": 4, "hung": 5}


class Run:
    """What the results file has said so far, across the pytest processes of one supervised run."""

    def __init__(self, path: str):
        self.path, self.offset = path, 0
        self.collected: list[str] | None = None
        self.outcomes: dict[str, tuple[str, str]] = {}
        self.current: str | None = None
        self.since = 0.0

    def read(self) -> None:
        with open(self.path) as f:
            f.seek(self.offset)
            text = f.read()
        complete = text[: text.rfind("\n") + 1]  # a line still being written waits for the next read
        self.offset += len(complete)
        for line in complete.splitlines():
            entry = json.loads(line)
            if "collected" in entry:  # each pytest run collects; the first run's list is the whole
                self.collected = self.collected if self.collected is not None else entry["collected"]
            elif "start" in entry:
                self.current, self.since = entry["start"], time.monotonic()
            elif "finish" in entry:
                self.current = None
            else:
                self.outcome(entry["nodeid"], entry["outcome"], entry["message"])

    def outcome(self, nodeid: str, outcome: str, message: str) -> None:
        old = self.outcomes.get(nodeid)
        if old is None or RANK[outcome] > RANK[old[0]]:
            self.outcomes[nodeid] = (outcome, message)


def _stop(proc: subprocess.Popen, wait: float) -> None:
    """SIGINT to pytest's session (it prints its summary if it can), SIGKILL if it is still there
    after `wait` seconds."""
    for sig, limit in ((signal.SIGINT, wait), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(limit)
            return
        except subprocess.TimeoutExpired:
            pass


def _stack_excerpt(path: str, lines: int = 4) -> list[str]:
    """The first frames of the last stack dump: where the hung test was."""
    try:
        with open(path) as f:
            dump = f.read().strip().split("Thread 0x")
    except OSError:
        return []
    current = next((d for d in reversed(dump) if "most recent call first" in d and "(most recent" in d), None)
    frames = [line.strip() for line in (current or "").splitlines() if line.strip().startswith("File")]
    return frames[:lines]


def marked_files(marker: str, exclude: list[str]) -> list[str]:
    """The test files that use `marker` (pytest.mark.NAME or the requires_NAME decorator)."""
    uses = re.compile(rf"\bmark\.{marker}\b|@requires_{marker}\b")
    excluded = {os.path.normpath(p) for p in exclude}
    files = []
    for path in sorted(glob.glob("tests/test_*.py")):
        with open(path) as f:
            if os.path.normpath(path) not in excluded and uses.search(f.read()):
                files.append(path)
    return files


def supervise(args, pytest_args: list[str], log) -> int:
    def say(text: str) -> None:
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    start = time.monotonic()
    end = start + args.deadline
    workdir = tempfile.mkdtemp(prefix="gpu-tests-")
    run = Run(os.path.join(workdir, "results.jsonl"))
    open(run.path, "w").close()
    env = dict(os.environ, **{RESULTS_ENV: run.path, LIMIT_ENV: str(args.per_test)})
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    stopped, processes, exits = None, 0, []
    interrupted = []
    # The part's own time limit (timeout -s INT): noted, and the loop below stops pytest and
    # summarizes; an exception here could land in the middle of stopping it.
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    while True:
        deselect = [f"--deselect={nodeid}" for nodeid in run.outcomes]
        command = [sys.executable, "-m", "pytest", "-p", "gpu_tests", *pytest_args, *deselect]
        log.write(f"\n$ {' '.join(command[:8])}{' ...' if len(command) > 8 else ''}\n")
        log.flush()
        processes += 1
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        hung = None
        while proc.poll() is None:
            time.sleep(0.2)
            run.read()
            if run.current is not None and time.monotonic() - run.since > args.per_test + args.grace:
                hung = run.current
                break
            if interrupted or time.monotonic() > end:
                stopped = "SIGINT" if interrupted else f"the {args.deadline:g} s deadline"
                break
        if proc.poll() is None:
            _stop(proc, HUNG_SIGINT_WAIT if hung else args.sigint_wait)
        exits.append(proc.returncode)
        run.read()
        if hung is not None:
            run.outcome(hung, "hung", f"still running {args.per_test + args.grace:g} s after it started; killed")
            say(f"!! {args.title}: {hung} hung; killed pytest, " + ("stopping" if stopped else "starting it again"))
            for frame in _stack_excerpt(run.path + ".stacks"):
                say(f"     {frame}")
        elif run.current is not None and stopped is None:
            run.outcome(run.current, "crashed", f"pytest exited ({proc.returncode}) while it ran")
            say(f"!! {args.title}: pytest exited ({proc.returncode}) during {run.current}; starting it again")
        else:
            break
        run.current = None
        left = [n for n in run.collected or [] if n not in run.outcomes]
        if stopped or not left:
            break
    counts = {}
    for outcome, _ in run.outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    not_run = [n for n in run.collected or [] if n not in run.outcomes]
    parts = [f"{counts[k]} {k}" for k in RANK if counts.get(k)]
    if not_run:
        parts.append(f"{len(not_run)} not run ({stopped or 'pytest stopped'})")
    say(f"== {args.title}: {', '.join(parts) or 'no test ran'} "
        f"({processes} pytest run{'s' if processes > 1 else ''}, exit {','.join(map(str, exits))}, "
        f"{time.monotonic() - start:.1f} s)")
    bad = [(n, o, m) for n, (o, m) in run.outcomes.items() if RANK[o] >= RANK["failed"]]
    for nodeid, outcome, message in bad:
        say(f"{outcome.upper():<8} {nodeid} - {message}")
    if not run.outcomes:
        # Nothing ran (a collection error, an empty selection): pytest's last words say why.
        log.flush()
        with open(args.log) as f:
            tail = f.read().splitlines()[-12:]
        say(f"no test ran; the end of pytest's output ({args.log}):")
        for line in tail:
            say(f"  | {line}")
    return 1 if bad or not_run or not run.outcomes else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--title", default="tests")
    p.add_argument("--per-test", type=float, default=30.0, help="seconds a test may take (default %(default)s)")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds after the limit before a test that did not stop is killed (default %(default)s)")
    p.add_argument("--deadline", type=float, default=600.0,
                   help="seconds after which pytest is stopped; the supervisor ends within --sigint-wait "
                        "and a second more (default %(default)s)")
    p.add_argument("--sigint-wait", type=float, default=6.0,
                   help="seconds pytest is given at the deadline to stop after SIGINT and print its summary, "
                        "before it is killed (default %(default)s)")
    p.add_argument("--log", required=True, help="pytest's output and the summary are appended here")
    p.add_argument("--marker", default=None, help="run the tests with this marker, in the files that use it")
    p.add_argument("--exclude", action="append", default=[], help="a test file --marker leaves out")
    args = p.parse_args(argv[:split])
    pytest_args = argv[split + 1:]
    if args.marker:
        files = marked_files(args.marker, args.exclude)
        if not files:
            print(f"== {args.title}: no test file uses the marker {args.marker!r}", flush=True)
            return 1
        pytest_args = [*pytest_args, "-m", args.marker, *files]
    with open(args.log, "a") as log:
        return supervise(args, pytest_args, log)


if __name__ == "__main__":
    raise SystemExit(main())
