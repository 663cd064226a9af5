"""The sandbox's supervisor: the code that runs inside the sandbox, around the program.

`align.sandbox` runs this file's source as `python -I -S -B -c <source> <config>`, in the
sandbox's namespaces and as its user. The supervisor confines itself (no_new_privs, not
dumpable, Landlock), starts the program under its resource limits through a bootstrap, waits
for it and writes how it ended to the status file. The isolation layers are described in
`align.sandbox`.

The child has no site-packages and no path to the toolkit, so this module imports the standard
library only, never `align`. It is also the one home of the Landlock interface: the parent reads
the kernel's Landlock ABI version with `landlock_abi()`.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import subprocess
import sys

# Processes of the sandbox besides the program's own: `unshare` and the supervisor.
_SUPERVISOR_PROCESSES = 2

# Linux syscalls and Landlock constants (include/uapi/linux/landlock.h). Landlock's syscall
# numbers are the same on every architecture that has them (x86_64, aarch64, ...).
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_FS_WRITE_FILE = 1 << 1
_FS_REMOVE_DIR = 1 << 4
_FS_REMOVE_FILE = 1 << 5
_FS_MAKE_CHAR = 1 << 6
_FS_MAKE_DIR = 1 << 7
_FS_MAKE_REG = 1 << 8
_FS_MAKE_SOCK = 1 << 9
_FS_MAKE_FIFO = 1 << 10
_FS_MAKE_BLOCK = 1 << 11
_FS_MAKE_SYM = 1 << 12
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
_NET_BIND_TCP = 1 << 0  # ABI 4
_NET_CONNECT_TCP = 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1  # ABI 6

# The program's bootstrap. It reads the run's token from stdin before the program starts and
# writes it to the `done` file only when the program returned normally: an early sys.exit(0)
# or os._exit(0) leaves `completed` False. The token is never in the program's source, its
# arguments or its environment, and stdin is at end of file once it is read.
_BOOTSTRAP = """\
import os, runpy, sys
def _bootstrap(done_fd):
    token = os.read(0, 64)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.argv = ["main.py"]
    sys.path.insert(0, os.getcwd())
    runpy.run_path("main.py", run_name="__main__")
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(done_fd, token)
_bootstrap(int(sys.argv[1]))
"""


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when there is none."""
    if not sys.platform.startswith("linux"):
        return 0
    version = _libc().syscall(
        ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET),
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(int(version), 0)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _confine_self(work: str, abi: int) -> None:
    """Confines this process and its children: no_new_privs; not dumpable (the program cannot
    ptrace the supervisor to forge its report); with Landlock, writes only under `work` and to
    /dev/null, no TCP, and no signals or abstract unix sockets out of the sandbox."""
    libc = _libc()

    def check(result: int, what: str) -> int:
        if result < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"{what}: {os.strerror(error)}")
        return result

    check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    check(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    if abi < 1:
        return
    writes = (
        _FS_WRITE_FILE
        | _FS_REMOVE_DIR
        | _FS_REMOVE_FILE
        | _FS_MAKE_CHAR
        | _FS_MAKE_DIR
        | _FS_MAKE_REG
        | _FS_MAKE_SOCK
        | _FS_MAKE_FIFO
        | _FS_MAKE_BLOCK
        | _FS_MAKE_SYM
        | (_FS_REFER if abi >= 2 else 0)
        | (_FS_TRUNCATE if abi >= 3 else 0)
        | (_FS_IOCTL_DEV if abi >= 5 else 0)
    )
    ruleset = _RulesetAttr(
        handled_access_fs=writes,
        # Handled with no rule: every TCP bind and connect is denied.
        handled_access_net=(_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0,
        scoped=(_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if abi >= 6 else 0,
    )
    ruleset_fd = check(
        libc.syscall(
            ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET),
            ctypes.byref(ruleset),
            ctypes.c_size_t(ctypes.sizeof(ruleset)),
            ctypes.c_uint32(0),
        ),
        "landlock_create_ruleset",
    )
    file_rights = _FS_WRITE_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
    for path, allowed in ((work, writes), (os.devnull, writes & file_rights)):
        path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = _PathBeneathAttr(allowed_access=allowed, parent_fd=path_fd)
        check(
            libc.syscall(
                ctypes.c_long(_SYS_LANDLOCK_ADD_RULE),
                ctypes.c_int(ruleset_fd),
                ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            ),
            f"landlock_add_rule({path})",
        )
        os.close(path_fd)
    check(
        libc.syscall(
            ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset_fd), ctypes.c_uint32(0)
        ),
        "landlock_restrict_self",
    )
    os.close(ruleset_fd)


def _limit_program(config: dict) -> None:
    """Sets the program's resource limits; runs in the program's process before exec."""
    cpu = math.ceil(config["cpu_seconds"])
    memory = config["memory_mb"] * 1024 * 1024
    file_size = config["max_file_mb"] * 1024 * 1024
    # RLIMIT_NPROC counts the user's processes in this user namespace: unshare and the
    # supervisor besides the program.
    processes = config["max_processes"] + _SUPERVISOR_PROCESSES
    # SIGXCPU at the soft limit; SIGKILL a second later if the program ignores it.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


def _supervise(config: dict) -> None:
    """Confines itself, runs the program under its limits and reports how it ended.

    `config` is the JSON object `align.sandbox.Sandbox._execute` passes as the first argument.
    The report goes to the status file, which the program cannot write: its descriptor is
    closed in the program, and Landlock denies opening it again.
    """
    status_fd = config["status_fd"]

    def report(**fields) -> None:
        os.write(status_fd, json.dumps(fields).encode())

    try:
        _confine_self(config["work"], config["landlock_abi"])
        program = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-c", _BOOTSTRAP, str(config["done_fd"])],
            pass_fds=(config["done_fd"],),
            preexec_fn=lambda: _limit_program(config),  # this process has no other thread
        )
    except Exception as error:
        report(error=f"{type(error).__name__}: {error}")
        return
    _, wait_status, usage = os.wait4(program.pid, 0)
    program.returncode = 0  # reaped above; keeps Popen from waiting again
    cpu_seconds = usage.ru_utime + usage.ru_stime
    if os.WIFSIGNALED(wait_status):
        report(signal=os.WTERMSIG(wait_status), cpu_seconds=cpu_seconds)
    else:
        report(exit=os.WEXITSTATUS(wait_status), cpu_seconds=cpu_seconds)


if __name__ == "__main__":
    _supervise(json.loads(sys.argv[1]))
