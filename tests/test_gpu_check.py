"""scripts/gpu_check.sh's pieces, on the CPU: the parts' limits fit one 6.5-minute call; the test
supervisor costs a hung or crashed test that test alone and always prints a summary; the summary
reads what the parts wrote; the correctness script reports an ordering fault. (`make
gpu-check-dry`, in CI, runs the whole script as a dry run.)"""

import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, SCRIPTS)

import gpu_summary  # noqa: E402
import gpu_tests  # noqa: E402

# Each piece picks its device itself (the correctness script runs on the asynchronous one).
pytestmark = pytest.mark.sync_pass_only

PARTS = ["setup", "probe", "build", "correctness", "cuda_tests", "gpu_tests", "bench", "summary"]


def test_the_parts_limits_add_up_to_six_and_a_half_minutes():
    listed = subprocess.run(["bash", os.path.join(SCRIPTS, "gpu_check.sh"), "--limits"], capture_output=True,
                            text=True, check=True, timeout=30).stdout.split()
    limits = dict(entry.split("=") for entry in listed)
    assert list(limits) == PARTS
    assert sum(int(v) for v in limits.values()) <= 390
    assert int(limits["probe"]) <= 20 and int(limits["correctness"]) <= 40


def test_limits_over_390_s_are_refused(tmp_path):
    with open(os.path.join(SCRIPTS, "gpu_check.sh")) as f:
        script = f.read().replace("bench=75 ", "bench=76 ")
    (tmp_path / "gpu_check.sh").write_text(script)
    proc = subprocess.run(["bash", str(tmp_path / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "add up to 391 s, more than 390 s" in proc.stderr
    assert not (tmp_path / "out").exists()


DEMO = '''
import os, signal, time

def test_a_pass():
    pass

def test_b_python_hang():
    time.sleep(60)

def test_c_hang_in_c():
    # As a C call stuck with the GIL released: no Python signal handler runs, so only a kill stops it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGINT})
    time.sleep(60)

def test_d_crash():
    os.kill(os.getpid(), signal.SIGSEGV)

def test_e_pass():
    pass
'''


def supervise(tmp_path, *args, tests=DEMO, pytest_args=()):
    (tmp_path / "tests").mkdir(exist_ok=True)
    (tmp_path / "tests" / "test_demo.py").write_text(tests)
    log = tmp_path / "tests.txt"
    proc = subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "gpu_tests.py"), "--title", "demo",
                             "--log", str(log), *args, "--", "-q", "-p", "no:cacheprovider", *pytest_args,
                             "tests/test_demo.py"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, log


def test_a_hung_or_crashed_test_costs_that_test_alone_and_the_summary_prints(tmp_path):
    proc, log = supervise(tmp_path, "--per-test", "1.5", "--grace", "1.5", "--deadline", "120")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    summary = next(line for line in out.splitlines() if line.startswith("== demo:"))
    # The Python-level hang is interrupted inside its test; the hang in C is killed and pytest
    # starts again; so does the crash; the last test runs after both.
    assert summary.startswith("== demo: 2 passed, 1 failed, 1 crashed, 1 hung (3 pytest runs"), summary
    lines = out.splitlines()
    assert "FAILED   tests/test_demo.py::test_b_python_hang - gpu_tests.TestTimedOut: ran past its 1.5 s limit" in lines
    assert any(line.startswith("HUNG     tests/test_demo.py::test_c_hang_in_c - still running 3 s") for line in lines)
    assert any(line.startswith("CRASHED  tests/test_demo.py::test_d_crash - pytest exited (-11)") for line in lines)
    # Where the hang was, from faulthandler's dump: the test's own line.
    assert any("test_demo.py\", line 13 in test_c_hang_in_c" in line for line in lines)
    text = log.read_text()
    assert summary in text and text.count("$ ") == 3  # pytest's own output, run by run


def test_the_deadline_and_a_sigint_stop_pytest_and_still_summarize(tmp_path):
    slow = ("import time\n\ndef test_a_pass():\n    pass\n\ndef test_b_slow():\n    time.sleep(60)\n\n"
            "def test_c_pass():\n    pass\n")
    # A loaded CPU can take seconds to format pytest's KeyboardInterrupt report.
    proc, _ = supervise(tmp_path, "--per-test", "60", "--deadline", "4", "--sigint-wait", "30", tests=slow)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "== demo: 1 passed, 2 not run (the 4 s deadline)" in out
    assert "KeyboardInterrupt" in (tmp_path / "tests.txt").read_text()  # pytest stopped on SIGINT, reporting
    proc, _ = supervise(tmp_path, "--per-test", "60", "--deadline", "60", "--sigint-wait", "30", tests=slow)
    time.sleep(4)  # test_b_slow is running
    proc.send_signal(signal.SIGINT)  # what the part's `timeout -s INT` sends
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "2 not run (SIGINT)" in out, out


def test_a_selection_that_runs_nothing_fails(tmp_path):
    proc, _ = supervise(tmp_path, tests="def test_a():\n    pass\n", pytest_args=("-m", "cuda"))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "no test ran; the end of pytest's output" in out and "1 deselected" in out, out


def test_the_gpu_selection_is_the_marked_tests_outside_test_cuda(monkeypatch):
    monkeypatch.chdir(ROOT)
    files = gpu_tests.marked_files("cuda", ["tests/test_cuda.py"])
    assert "tests/test_cuda.py" not in files
    assert {"tests/test_ops.py", "tests/test_share.py"} <= set(files)
    assert "tests/test_cuda.py" in gpu_tests.marked_files("cuda", [])


def test_the_slowest_units_come_from_ninja_log_of_this_build(tmp_path):
    temp = tmp_path / "build" / "temp.linux-x86_64-cpython-312"
    (temp / "csrc").mkdir(parents=True)
    for name in ("engine.o", "swap.o", "bindings.o"):
        (temp / "csrc" / name).write_bytes(b"")
    old = temp / "csrc" / "old.o"
    old.write_bytes(b"")
    os.utime(old, (1, 1))  # built by an earlier build
    (temp / ".ninja_log").write_text(
        "# ninja log v5\n"
        f"0\t90000\t0\t{old}\tabc\n"
        f"0\t1000\t0\t{temp}/csrc/engine.o\tabc\n"
        f"0\t5000\t0\t{temp}/csrc/swap.o\tabc\n"
        "0\t62000\t0\tcsrc/bindings.o\tabc\n"  # relative to the log's folder
        f"100\t41100\t0\t{temp}/csrc/engine.o\tdef\n"  # built again: the later line counts
    )
    units = gpu_summary.slowest_units(str(tmp_path / "build"), since=time.time() - 60)
    assert units == [("csrc/bindings.o", 62.0), ("csrc/engine.o", 41.0), ("csrc/swap.o", 5.0)]
    assert gpu_summary.slowest_units(str(tmp_path / "nothing"), None) == []


def test_the_summary_shows_what_went_wrong_and_counts_the_files(tmp_path):
    out, state = tmp_path / "out", tmp_path / "state"
    out.mkdir()
    state.mkdir()
    (state / "parts.tsv").write_text("probe\t20\t9\tok\nbuild\t120\t31\tFAILED (exit 1)\n"
                                     "correctness\t40\t12\tFAILED (exit 1)\nsummary\t5\t-\tok\n")
    (out / "build.log").write_text("[1/9] c++ engine.cpp\ncsrc/engine.cpp:3:10: fatal error: x.h: No such file\n")
    (out / "correctness.txt").write_text(
        "correctness on cuda: 8 blocks ...\n"
        "prefetch 0                                         EXACT  (0.4 s)\n"
        "prefetch 1                                         MISMATCH max|diff| 3.052e-05  (0.5 s)\n"
        "budget: 4 of 8 blocks resident                     EXACT  (0.6 s)\n"
        "  bytes copied per step [4, 9, 2]; resident 4, streamed 4 blocks = 2 B: OK\n"
        "correctness: PROBLEMS: prefetch 1 (3.1 s)\n")
    (out / "tests.txt").write_text("$ python -m pytest\n.F\n== CUDA tests: 1 passed, 1 failed (1 pytest run)\n"
                                   "FAILED   tests/test_cuda.py::test_x - AssertionError: assert False\n")
    summary = [sys.executable, os.path.join(SCRIPTS, "gpu_summary.py"), str(out), str(state)]
    proc = subprocess.run(summary, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (out / "summary.txt").read_text()
    assert text == proc.stdout
    assert "  2 of 3 cases EXACT; correctness: PROBLEMS: prefetch 1 (3.1 s)" in text
    assert "MISMATCH max|diff| 3.052e-05" in text and "bytes copied per step [4, 9, 2]" in text
    assert "CUDA tests: 1 passed, 1 failed" in text and "FAILED   tests/test_cuda.py::test_x" in text
    assert "correctness     40    12  FAILED (exit 1)" in text and "(no bench.json" in text
    assert "  csrc/engine.cpp:3:10: fatal error: x.h: No such file" in text
    for i in range(5):  # with the four above, 9 files: more than a device call brings back
        (out / f"extra{i}").write_text("")
    proc = subprocess.run(summary, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "PROBLEM: 9 files under" in proc.stdout


def correctness(*env):
    return subprocess.run([sys.executable, "-m", "fastvideo_offload.bench.correctness", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, FASTVIDEO_OFFLOAD_CPU_TRANSFER="async", OMP_NUM_THREADS="1",
                                   **dict(env)))


def test_the_correctness_script_is_exact_on_the_asynchronous_device():
    proc = correctness()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(" EXACT  (" in line for line in lines) == 9
    assert [line.split(": ")[-1] for line in lines if line.startswith("  bytes copied per step")] == ["OK", "OK"]
    assert lines[-1].startswith("correctness: all exact")


@pytest.mark.parametrize("fault", ["skip_ready_wait", "reuse_staging_early"])
def test_the_correctness_script_reports_an_ordering_fault(fault):
    """An ordering mistake switched on in the engine: the cases it touches are reported and the
    script fails."""
    proc = correctness(("FASTVIDEO_OFFLOAD_INJECT_FAULT", fault))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    bad = [line for line in proc.stdout.splitlines() if " ERROR " in line or " MISMATCH " in line]
    assert bad and "correctness: PROBLEMS: " in proc.stdout.splitlines()[-1]
    if fault == "reuse_staging_early":
        assert all("staged" in line for line in bad)
