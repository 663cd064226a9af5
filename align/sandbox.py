"""A sandbox for untrusted Python: code-execution rewards run model-written programs here.

Each program runs in fresh processes, confined by these layers:

- namespaces (util-linux `unshare`): new user, network, pid, mount and IPC namespaces. The
  network namespace has only a loopback device that is down, so no socket reaches anything,
  the host's 127.0.0.1 included. In the pid namespace the sandbox's supervisor is pid 1: when
  it exits or is killed, the kernel kills every process left in the namespace, so nothing a
  program starts (a fork bomb, a daemonised child) outlives its run. `/proc` is remounted, so
  the program sees only its own processes (not the trainer's command line).
- an unprivileged user: when the trainer runs as root, the sandbox runs as uid/gid 65534
  (nobody), so file permissions apply to it and RLIMIT_NPROC is enforced (root is exempt).
- Landlock: writing, creating, renaming or removing files is denied everywhere except in the
  run's fresh working directory (and /dev/null). Reading is allowed. Landlock also denies TCP
  bind/connect (ABI >= 4) and signals or abstract unix sockets leaving the sandbox (ABI >= 6).
- resource limits on the program: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), file
  size (RLIMIT_FSIZE, which also bounds stdout and stderr), processes and threads
  (RLIMIT_NPROC, counted per sandbox in its user namespace), no core dumps.
- a wall-clock limit, after which the whole process tree is killed.
- a scrubbed environment: PATH, HOME and TMPDIR (both the working directory) and LANG only.

The program is stdlib-only Python (`python -I -S`: no site-packages, no PYTHON* variables), runs
with stdin at end of file, and its stdout and stderr are kept up to `max_output_bytes` each.

Not covered: memory and CPU time across a process tree (each process gets `memory_mb` and
`cpu_seconds`; the wall-clock limit bounds the total time), total disk use in the working
directory (each file is bounded), reading world-readable files, and connecting to unix sockets
by path that the sandbox's user may write to. When the trainer is not root the sandbox runs as
the trainer's user, so it can read that user's files. Without namespaces (`strict=False`),
processes that leave the sandbox's process group may outlive the run, and RLIMIT_NPROC counts
every process of the sandbox's user.

The supervisor, the code that runs inside the sandbox around the program, is
`align/sandbox_supervisor.py`: the parent runs its source with `python -I -S -B -c`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from align import sandbox_supervisor

log = logging.getLogger(__name__)

# The user the sandbox runs as when the trainer is root: nobody.
SANDBOX_UID = 65534
SANDBOX_GID = 65534
# The whole environment a program sees, besides HOME and TMPDIR.
_PATH = "/usr/local/bin:/usr/bin:/bin"
_UNSHARE_FLAGS = (
    "--map-current-user",
    "--net",
    "--pid",
    "--mount-proc",
    "--ipc",
    "--fork",
    "--kill-child",
)
# Seconds to wait for a killed sandbox's namespace to empty.
_REAP_SECONDS = 5.0


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use."""

    # CPU seconds of each process of the program (RLIMIT_CPU); more counts as a timeout.
    cpu_seconds: float = 5.0
    # Wall-clock seconds for the whole run; then every process of the sandbox is killed.
    wall_seconds: float = 10.0
    # Address space of each process, in MiB (RLIMIT_AS).
    memory_mb: int = 512
    # Bytes of stdout and of stderr kept; more sets `truncated`.
    max_output_bytes: int = 65536
    # Largest file the program may write, stdout and stderr included, in MiB (RLIMIT_FSIZE).
    max_file_mb: int = 16
    # Processes and threads the program may have at once, its main process included. Memory is
    # limited per process, so this also bounds a sandbox's memory at memory_mb x max_processes.
    max_processes: int = 16

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds", "memory_mb", "max_output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0 (got {getattr(self, name)})")
        for name in ("max_file_mb", "max_processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"SandboxLimits.{name} must be >= 1 (got {getattr(self, name)})")


@dataclass
class SandboxResult:
    """The outcome of one program."""

    # "ok": exit status 0; "failed": the program exited non-zero, raised or was killed (memory,
    # signal); "timeout": it hit the CPU or wall-clock limit; "error": the sandbox itself
    # could not run it (never the program's fault).
    status: Literal["ok", "failed", "timeout", "error"]
    # The program's exit status, -N when signal N killed it; None on timeout or error.
    returncode: int | None
    # The program's stdout, cut to `max_output_bytes`.
    stdout: str
    # The program's stderr, cut to `max_output_bytes`.
    stderr: str
    # Whether stdout or stderr was cut.
    truncated: bool
    # Seconds from start to the end of the run.
    wall_seconds: float
    # Whether the program ran to its end: it returned normally, not by an early sys.exit or
    # os._exit (checked with a per-run token the program's own code is not given).
    completed: bool
    # Why the status is what it is, in words ("" when ok).
    detail: str


@dataclass(frozen=True)
class Isolation:
    """The isolation this machine offers, as `probe_isolation` found it."""

    # An interpreter the sandbox's user can run; None when there is none.
    python: str | None
    # Why the namespaces (util-linux `unshare`) cannot be used; None when they can.
    namespaces_error: str | None
    # The kernel's Landlock ABI version; 0 when Landlock is unavailable.
    landlock_abi: int

    def missing(self) -> list[str]:
        """The isolation layers that are unavailable, each with why."""
        missing = []
        if self.namespaces_error is not None:
            missing.append(f"namespaces ({self.namespaces_error})")
        if self.landlock_abi < 1:
            missing.append("landlock (the kernel does not offer it)")
        return missing


def _sandbox_user() -> dict:
    """Popen keyword arguments that run the sandbox as nobody when this process is root."""
    if os.geteuid() != 0:
        return {}
    return {"user": SANDBOX_UID, "group": SANDBOX_GID, "extra_groups": []}


def _runs(command: list[str]) -> str | None:
    """Runs `command` as the sandbox's user; None when it succeeds, else why not."""
    try:
        done = subprocess.run(
            command,
            env={"PATH": _PATH, "LANG": "C.UTF-8"},
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            **_sandbox_user(),
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"{type(error).__name__}: {error}"
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        return f"exit status {done.returncode}: {message[-1] if message else 'no message'}"
    return None


@functools.cache
def probe_isolation() -> Isolation:
    """Finds, once per process, which isolation layers work here and which interpreter to use.

    The interpreter is this process's own when the sandbox's user may run it (a virtual
    environment under a private home directory is not runnable by nobody), else `python3`.
    """
    candidates = [sys.executable, shutil.which("python3", path=_PATH)]
    python = next((p for p in candidates if p and _runs([p, "-I", "-S", "-c", ""]) is None), None)
    unshare = shutil.which("unshare", path=_PATH)
    if unshare is None:
        namespaces_error = "util-linux `unshare` is not installed"
    elif python is None:
        namespaces_error = "not checked: no interpreter runs as the sandbox's user"
    else:
        namespaces_error = _runs([unshare, *_UNSHARE_FLAGS, "--", python, "-I", "-S", "-c", ""])
    isolation = Isolation(python, namespaces_error, sandbox_supervisor.landlock_abi())
    log.debug("sandbox isolation: %s", isolation)
    return isolation


@functools.cache
def _supervisor_source() -> str:
    """The supervisor's source, which the child runs as text: it imports nothing of `align`
    (no site-packages there), and the sandbox's user may not be able to read the toolkit's
    files."""
    with open(sandbox_supervisor.__file__, encoding="utf-8") as source:
        return source.read()


class Sandbox:
    """Runs untrusted Python programs, `concurrency` at a time, within `limits`.

    Args:
        limits: what each program may use.
        concurrency: programs running at once, over all callers of this sandbox.
        strict: refuse to run (status "error") when an isolation layer is missing; with False,
            run with what there is and log one warning listing what is missing.
        isolation: the machine's isolation layers; probed once per process when None.
    """

    def __init__(
        self,
        limits: SandboxLimits = SandboxLimits(),
        concurrency: int = 2,
        strict: bool = True,
        isolation: Isolation | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 (got {concurrency})")
        self.limits = limits
        self.concurrency = concurrency
        self.strict = strict
        self.isolation = isolation if isolation is not None else probe_isolation()
        self._slots = threading.BoundedSemaphore(concurrency)
        missing = self.isolation.missing()
        if missing and not strict:
            log.warning(
                "the code sandbox runs WITHOUT these isolation layers (strict=False): %s. "
                "Untrusted code may then reach the network, write outside its directory or "
                "leave processes behind.",
                "; ".join(missing),
            )

    def run(self, code: str) -> SandboxResult:
        """Runs `code` as a Python program; waits for a free slot first."""
        refusal = self._refusal()
        if refusal is not None:
            return _error(refusal, 0.0)
        with self._slots:
            start = time.monotonic()
            try:
                return self._run(code, start)
            except Exception as error:  # the sandbox's own failure, never the program's
                log.debug("sandbox run failed", exc_info=True)
                detail = f"sandbox failure: {type(error).__name__}: {error}"
                return _error(detail, time.monotonic() - start)

    def run_many(self, codes: list[str]) -> list[SandboxResult]:
        """Runs several programs, `concurrency` at a time; results in the order of `codes`."""
        if not codes:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(codes))) as pool:
            return list(pool.map(self.run, codes))

    def _refusal(self) -> str | None:
        if self.isolation.python is None:
            return "no Python interpreter can be run by the sandbox's user (uid 65534 when root)"
        missing = self.isolation.missing()
        if missing and self.strict:
            return (
                f"sandbox isolation missing: {'; '.join(missing)}. Fix the machine, or allow "
                "running without it with strict=False (the code_tests reward's `strict: false`)."
            )
        return None

    def _run(self, code: str, start: float) -> SandboxResult:
        root = tempfile.mkdtemp(prefix="sandbox-")
        try:
            # `root` holds the parent's files (output, status); only `work` is the program's.
            os.chmod(root, 0o711)
            work = os.path.join(root, "work")
            os.mkdir(work, 0o700)
            main = os.path.join(work, "main.py")
            with open(main, "w", encoding="utf-8") as file:
                file.write(code)
            if os.geteuid() == 0:
                for path in (work, main):
                    os.chown(path, SANDBOX_UID, SANDBOX_GID)
            files = {
                name: os.open(os.path.join(root, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                for name in ("stdout", "stderr", "status", "done")
            }
            try:
                return self._execute(work, files, start)
            finally:
                for fd in files.values():
                    os.close(fd)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _execute(self, work: str, files: dict[str, int], start: float) -> SandboxResult:
        limits, isolation = self.limits, self.isolation
        config = {
            "work": work,
            "cpu_seconds": limits.cpu_seconds,
            "memory_mb": limits.memory_mb,
            "max_file_mb": limits.max_file_mb,
            "max_processes": limits.max_processes,
            "landlock_abi": isolation.landlock_abi,
            "status_fd": files["status"],
            "done_fd": files["done"],
        }
        command = [
            isolation.python,
            "-I",
            "-S",
            "-B",
            "-c",
            _supervisor_source(),
            json.dumps(config),
        ]
        namespaced = isolation.namespaces_error is None
        if namespaced:
            command = [shutil.which("unshare", path=_PATH), *_UNSHARE_FLAGS, "--", *command]
        token = secrets.token_hex(16).encode()
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=files["stdout"],
            stderr=files["stderr"],
            pass_fds=(files["status"], files["done"]),
            cwd=work,
            env={"PATH": _PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"},
            start_new_session=True,
            **_sandbox_user(),
        )
        with _pidfd(process.pid) as exited:
            try:
                process.stdin.write(token)
                process.stdin.close()
            except BrokenPipeError:
                pass  # the sandbox died before reading its token; its status tells why
            timed_out = not select.select([exited], [], [], limits.wall_seconds)[0]
            if timed_out and namespaced:
                # Kill the namespace's pid 1: the kernel kills everything else in the namespace
                # before unshare can reap it, and unshare then exits.
                with _pidfd(_first_child(process.pid)) as init:
                    if init is not None:
                        _kill(init)
                        select.select([exited], [], [], _REAP_SECONDS)
            # Whatever is left in the group. Until `process` is reaped its pid is the group's
            # id, so the id cannot belong to anyone else.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        elapsed = time.monotonic() - start
        stdout, stdout_cut = _read(files["stdout"], limits.max_output_bytes)
        stderr, stderr_cut = _read(files["stderr"], limits.max_output_bytes)
        completed = _read(files["done"], 64)[0].encode() == token
        status, returncode, detail = self._outcome(timed_out, files["status"], process, stderr)
        return SandboxResult(
            status=status,
            returncode=returncode,
            stdout=stdout,
            stderr=stderr,
            truncated=stdout_cut or stderr_cut,
            wall_seconds=elapsed,
            completed=completed and status == "ok",
            detail=detail,
        )

    def _outcome(
        self, timed_out: bool, status_fd: int, process: subprocess.Popen, stderr: str
    ) -> tuple[str, int | None, str]:
        """(status, returncode, detail) from the supervisor's report."""
        if timed_out:
            return "timeout", None, f"killed after {self.limits.wall_seconds:g} s of wall clock"
        try:
            report = json.loads(_read(status_fd, 4096)[0])
        except ValueError:
            last = stderr.strip().splitlines()[-1:] or ["no message"]
            return "error", None, f"the sandbox exited {process.returncode} unreported: {last[0]}"
        if "error" in report:
            return "error", None, f"sandbox failure: {report['error']}"
        if "signal" in report:
            number = report["signal"]
            cpu_limit = self.limits.cpu_seconds
            if number == signal.SIGXCPU or (
                number == signal.SIGKILL and report["cpu_seconds"] >= cpu_limit
            ):
                return "timeout", -number, f"used its {cpu_limit:g} s of CPU time"
            return "failed", -number, f"killed by {signal.Signals(number).name}"
        if report["exit"] == 0:
            return "ok", 0, ""
        return "failed", report["exit"], f"exit status {report['exit']}"


def _error(detail: str, elapsed: float) -> SandboxResult:
    return SandboxResult("error", None, "", "", False, elapsed, False, detail)


class _pidfd:
    """A pidfd for `pid` (None stays None) that is closed on exit; readable once pid exits."""

    def __init__(self, pid: int | None) -> None:
        self.fd = None
        if pid is not None:
            try:
                self.fd = os.pidfd_open(pid)
            except ProcessLookupError:
                pass

    def __enter__(self) -> int | None:
        return self.fd

    def __exit__(self, *_) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _first_child(pid: int) -> int | None:
    """The first child of `pid` (unshare's child is its namespace's pid 1), or None."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            found = children.read().split()
    except OSError:
        return None
    return int(found[0]) if found else None


def _kill(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone


def _read(fd: int, limit: int) -> tuple[str, bool]:
    """The first `limit` bytes of the file behind `fd` as text, and whether there was more."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, limit, 0)
    return data.decode("utf-8", errors="replace"), size > limit
