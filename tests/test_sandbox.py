"""The code sandbox and the `code_tests` reward, against real attacks in real processes.

Each attack of docs/reliability.md ("Security") runs in the sandbox and the test checks from
outside that it was contained: the file is not there, the server saw no connection, no
process of the sandbox is left.
"""

from __future__ import annotations

import glob
import logging
import os
import resource
import secrets
import socket
import subprocess
import tempfile
import textwrap
import time

import pytest

from align.rewarding import Failed, RewardSpec, build_reward_set
from align.sandbox import Isolation, Sandbox, SandboxLimits, probe_isolation
from rewards.code import CodeTests, extract_code

FAST = SandboxLimits(cpu_seconds=2, wall_seconds=5)


def run(code: str, limits: SandboxLimits = FAST, **kwargs):
    return Sandbox(limits, **kwargs).run(textwrap.dedent(code))


def sandbox_processes() -> set[int]:
    """Pids of sandbox processes: by the supervisor's or bootstrap's command line, or by uid
    65534 when the tests run as root (which also finds zombies, whose command line is empty)."""
    found = set()
    for status_path in glob.glob("/proc/[0-9]*/status"):
        pid = int(status_path.split("/")[2])
        try:
            with open(status_path) as status:
                uid = next(line.split()[1] for line in status if line.startswith("Uid:"))
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except (OSError, StopIteration):
            continue  # gone meanwhile
        if b"_bootstrap(" in command or b"_supervise(" in command:
            found.add(pid)
        elif os.geteuid() == 0 and uid == "65534":
            found.add(pid)
    return found


def test_this_machine_offers_every_isolation_layer():
    isolation = probe_isolation()
    assert isolation.python is not None
    assert isolation.missing() == []


def test_a_program_runs_and_writes_in_its_own_directory():
    result = run(
        """
        import os
        with open("note.txt", "w") as note:
            note.write("kept")
        print(open("note.txt").read(), os.getcwd() == os.environ["HOME"])
        """
    )
    assert (result.status, result.returncode, result.completed) == ("ok", 0, True)
    assert result.stdout == "kept True\n"
    assert not result.truncated


def test_an_exception_fails_with_its_traceback():
    result = run("raise ValueError('broken')")
    assert (result.status, result.returncode, result.completed) == ("failed", 1, False)
    assert "ValueError: broken" in result.stderr


@pytest.mark.fault
def test_infinite_loop_hits_the_cpu_limit():
    start = time.monotonic()
    result = run("while True: pass", SandboxLimits(cpu_seconds=1, wall_seconds=10))
    assert result.status == "timeout"
    assert "CPU" in result.detail
    assert time.monotonic() - start < 4


@pytest.mark.fault
def test_sleeping_forever_hits_the_wall_clock_limit():
    before = sandbox_processes()
    start = time.monotonic()
    result = run("import time\ntime.sleep(1000)", SandboxLimits(wall_seconds=1))
    assert result.status == "timeout"
    assert result.returncode is None
    assert "wall clock" in result.detail
    assert 1 <= time.monotonic() - start < 3
    assert not sandbox_processes() - before


@pytest.mark.fault
def test_fork_bomb_is_contained_and_nothing_survives():
    before = sandbox_processes()
    start = time.monotonic()
    result = run(
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """,
        SandboxLimits(cpu_seconds=5, wall_seconds=2, max_processes=32),
    )
    assert result.status == "timeout"
    assert time.monotonic() - start < 4
    assert not sandbox_processes() - before
    assert subprocess.run(["true"]).returncode == 0  # the parent can still start processes


@pytest.mark.fault
def test_process_limit_caps_a_fork_bomb():
    # Each child sleeps, so the count only grows: it stops at max_processes (main included).
    result = run(
        """
        import errno, os, time
        forks = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                forks += 1
        except OSError as error:
            print(forks, error.errno == errno.EAGAIN)
        """,
        SandboxLimits(wall_seconds=5, max_processes=16),
    )
    assert result.status == "ok"
    assert result.stdout == "15 True\n"


@pytest.mark.fault
def test_processes_left_running_die_with_the_program():
    before = sandbox_processes()
    result = run(
        """
        import os, subprocess, time
        subprocess.Popen(["sleep", "1000"], start_new_session=True)
        if os.fork() == 0:
            os.setsid()
            time.sleep(1000)
        print("main done")
        """
    )
    assert (result.status, result.stdout) == ("ok", "main done\n")
    assert result.wall_seconds < 2
    assert not sandbox_processes() - before


@pytest.mark.fault
def test_memory_bomb_fails_and_the_parent_is_fine():
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    at_once = run("block = bytearray(4 * 1024**3)", SandboxLimits(memory_mb=256))
    growing = run(
        "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024**2))",
        SandboxLimits(memory_mb=256),
    )
    for result in (at_once, growing):
        assert result.status == "failed"
        assert "MemoryError" in result.stderr
    # ru_maxrss is in KiB: the parent did not grow by the bomb's size.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024
    assert run("print(1)").stdout == "1\n"


@pytest.mark.fault
def test_secret_environment_variables_are_not_visible(monkeypatch):
    secret = secrets.token_hex(8)
    monkeypatch.setenv("MOEALIGN_TEST_SECRET", secret)
    assert os.environ["MOEALIGN_TEST_SECRET"] == secret
    result = run(
        f"""
        import os
        print(sorted(os.environ))
        print(os.environ.get("MOEALIGN_TEST_SECRET"))
        for path in ("/proc/{os.getpid()}/environ", "/proc/1/environ", "/proc/2/environ"):
            try:
                print(path, open(path, "rb").read())
            except OSError as error:
                print(path, type(error).__name__)
        """
    )
    assert result.status == "ok", result.stderr
    assert secret not in result.stdout + result.stderr
    assert result.stdout.splitlines()[:2] == ["['HOME', 'LANG', 'PATH', 'TMPDIR']", "None"]


@pytest.mark.fault
def test_writes_outside_the_working_directory_fail(tmp_path):
    # /tmp and a world-writable directory let any user write: only Landlock stops these.
    open_dir = tempfile.mkdtemp(prefix="sandbox-target-")
    os.chmod(open_dir, 0o777)
    tmp_path.chmod(0o777)
    victim = os.path.join(open_dir, "victim.txt")
    with open(victim, "w") as file:
        file.write("original")
    os.chmod(victim, 0o666)
    created = [
        str(tmp_path / "escape.txt"),
        f"/tmp/sandbox-escape-{secrets.token_hex(8)}",
        os.path.join(open_dir, "escape.txt"),
        f"/dev/shm/sandbox-escape-{secrets.token_hex(8)}",
    ]
    try:
        result = run(
            f"""
            import os
            attempts = {{
                **{{f"write {{p}}": lambda p=p: open(p, "w").write("x") for p in {created!r}}},
                "mkdir": lambda: os.mkdir({open_dir!r} + "/escape-dir"),
                "symlink": lambda: os.symlink("/etc/passwd", {open_dir!r} + "/escape-link"),
                "overwrite": lambda: open({victim!r}, "w").write("changed"),
                "append": lambda: open({victim!r}, "a").write("changed"),
                "remove": lambda: os.remove({victim!r}),
                "rename": lambda: os.rename({victim!r}, "stolen.txt"),
            }}
            for name, attempt in attempts.items():
                try:
                    attempt()
                    print("ALLOWED", name)
                except OSError as error:
                    print("denied", name, error.errno)
            """
        )
        assert result.status == "ok", result.stderr
        assert "ALLOWED" not in result.stdout
        assert result.stdout.count("denied") == len(created) + 6
        for path in created:
            assert not os.path.exists(path)
        assert sorted(os.listdir(open_dir)) == ["victim.txt"]
        with open(victim) as file:
            assert file.read() == "original"
    finally:
        for path in created:
            if os.path.exists(path):
                os.remove(path)
        for name in os.listdir(open_dir):
            os.remove(os.path.join(open_dir, name))
        os.rmdir(open_dir)


@pytest.mark.fault
def test_sockets_reach_nothing():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        result = run(
            f"""
            import socket
            attempts = {{
                "parent's server": lambda: socket.create_connection(("127.0.0.1", {port}), 2),
                "dns server": lambda: socket.create_connection(("1.1.1.1", 53), 2),
                "udp": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(
                    b"x", ("1.1.1.1", 53)
                ),
            }}
            for name, attempt in attempts.items():
                try:
                    attempt()
                    print("CONNECTED", name)
                except OSError as error:
                    print("refused", name, error.errno)
            """
        )
        assert result.status == "ok", result.stderr
        assert "CONNECTED" not in result.stdout
        assert result.stdout.count("refused") == 3
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_output_is_truncated():
    result = run(
        """
        import sys
        print("o" * 1_000_000)
        print("e" * 1_000_000, file=sys.stderr)
        """,
        SandboxLimits(max_output_bytes=1000),
    )
    assert result.status == "ok"
    assert result.truncated
    assert result.stdout == "o" * 1000
    assert result.stderr == "e" * 1000


def test_concurrency_is_bounded():
    sandbox = Sandbox(SandboxLimits(wall_seconds=5), concurrency=2)
    program = "import time\nprint(time.time())\ntime.sleep(1)\nprint(time.time())"
    start = time.monotonic()
    results = sandbox.run_many([program] * 4)
    elapsed = time.monotonic() - start
    spans = [tuple(map(float, r.stdout.split())) for r in results]
    events = sorted([(begin, 1) for begin, _ in spans] + [(end, -1) for _, end in spans])
    running = [sum(change for _, change in events[: i + 1]) for i in range(len(events))]
    assert max(running) == 2
    assert 2.0 <= elapsed < 4.0


MISSING = Isolation(
    python="/usr/bin/python3", namespaces_error="unshare: not found", landlock_abi=0
)


def test_strict_mode_refuses_when_isolation_is_missing(tmp_path):
    marker = tmp_path / "ran"
    result = run(f"open({str(marker)!r}, 'w')", isolation=MISSING)
    assert result.status == "error"
    assert "namespaces (unshare: not found)" in result.detail
    assert "landlock" in result.detail
    assert "strict=False" in result.detail
    assert not marker.exists()


def test_relaxed_mode_runs_without_the_missing_layers_after_one_warning(caplog):
    caplog.set_level(logging.WARNING, logger="align.sandbox")
    sandbox = Sandbox(FAST, strict=False, isolation=MISSING)
    results = sandbox.run_many(["print('ran')", "print('ran')"])
    assert [(r.status, r.stdout, r.completed) for r in results] == [("ok", "ran\n", True)] * 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "namespaces" in warnings[0].getMessage()
    assert "landlock" in warnings[0].getMessage()


def test_a_sandbox_that_cannot_start_is_an_error():
    broken = Isolation(python="/nonexistent/python3", namespaces_error=None, landlock_abi=7)
    result = run("print(1)", isolation=broken)
    assert result.status == "error"
    assert "/nonexistent/python3" in result.detail


def test_extract_code():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```python\nx = 2\n```") == "x = 2\n"
    assert extract_code("```py\nx = 1\n```\n```text\nnot code\n```") == "x = 1\n"
    assert extract_code("```\nx = 3\n```") == "x = 3\n"
    assert extract_code("<think>hm</think><answer>x = 4</answer>") == "x = 4"
    assert extract_code("x = 5") == "x = 5"


SOLUTION = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0"


def test_code_tests_scores_pass_fail_and_rows_without_tests():
    reward = CodeTests(cpu_seconds=1, wall_seconds=3)
    completions = [
        SOLUTION,
        "```python\ndef add(a, b):\n    return a - b\n```",
        "```python\ndef add(a, b)\n    return a + b\n```",  # syntax error
        "```python\ndef add(a, b):\n    while True:\n        pass\n```",
        SOLUTION,
        SOLUTION,
    ]
    tests = [TESTS, TESTS, TESTS, TESTS, None, "  "]
    scores = reward([""] * 6, completions, tests=tests)
    assert scores == [1.0, 0.0, 0.0, 0.0, None, None]
    assert reward([""], [SOLUTION]) == [None]


@pytest.mark.fault
@pytest.mark.parametrize(
    "exit_early",
    [
        "import sys; sys.exit(0)",
        "import os; os._exit(0)",
        "raise SystemExit(0)",
        "exit()",
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        "print('All tests passed'); import os; os._exit(0)",
    ],
)
def test_exiting_before_the_tests_scores_zero(exit_early):
    completion = f"```python\ndef add(a, b):\n    return 0\n{exit_early}\n```"
    assert CodeTests(wall_seconds=3)([""], [completion], tests=[TESTS]) == [0.0]


def test_reward_set_scores_by_hand():
    reward_set = build_reward_set(
        [RewardSpec(name="code_tests", weight=2.0, options={"wall_seconds": 3, "cpu_seconds": 2})]
    )
    wrong = "```python\ndef add(a, b):\n    return 0\n```"
    batch = reward_set(["p"] * 3, [SOLUTION, wrong, SOLUTION], {"tests": [TESTS, TESTS, None]})
    assert batch.values["code_tests"] == [1.0, 0.0, None]
    # Totals: weight 2 * 1.0, 2 * 0.0, no applicable reward.
    assert batch.totals == [2.0, 0.0, None]
    assert batch.metrics["reward/code_tests/mean"] == 0.5
    assert batch.metrics["reward/code_tests/applicable"] == pytest.approx(2 / 3)
    assert batch.metrics["reward/code_tests/not_applicable"] == 1.0
    assert batch.metrics["reward/total/mean"] == 1.0
    assert batch.metrics["reward/unscored"] == 1.0
    assert "reward/code_tests/errors" not in batch.metrics


def test_a_sandbox_error_leaves_rows_unscored_not_zero():
    reward_set = build_reward_set([RewardSpec(name="code_tests", options={"wall_seconds": 3})])
    code_tests = reward_set.rewards[0].fn
    code_tests.sandbox = Sandbox(FAST, isolation=MISSING)  # strict, with layers missing
    direct = code_tests([""], [SOLUTION], tests=[TESTS])
    assert isinstance(direct[0], Failed)
    assert "sandbox isolation missing" in direct[0].reason
    batch = reward_set(["p"] * 3, [SOLUTION, SOLUTION, SOLUTION], {"tests": [TESTS, TESTS, None]})
    assert batch.values["code_tests"] == [None, None, None]
    assert batch.totals == [None, None, None]
    assert batch.metrics["reward/code_tests/errors"] == 2.0
    assert batch.metrics["reward/code_tests/not_applicable"] == 1.0
    assert batch.metrics["reward/unscored"] == 3.0
    assert "reward/code_tests/mean" not in batch.metrics
    assert reward_set.faults["code_tests/errors"] == 2
