"""Run model-written code in a separate, confined process: never in ours.

    run_program(source, timeout=3.0) -> Outcome(status, returncode, stdout, stderr, seconds)

Each program runs in a fresh child process that
- lives in new PID, mount and network namespaces when `unshare` allows (Linux; as root, or with
  unprivileged user namespaces): no network interfaces but a downed loopback, its own process
  tree (killing the tree's first process kills every process it started, however it forked),
  a fresh tmpfs on /tmp, /var/tmp and /dev/shm (its working directory; gone when it ends) and
  every other mount remounted read-only;
- runs as the unprivileged user `nobody` when we are root;
- has resource limits: CPU seconds, address space (a memory bomb fails to allocate), processes
  (a fork bomb fails to fork), open files, file size, no core dumps;
- sees only a minimal environment (no inherited secrets: API keys, tokens), and /dev/null as stdin;
- is killed with everything it started when the wall-clock limit passes.

Where the namespaces are not available (not Linux, or user namespaces disabled), the program
still runs as a separate process in its own session with the limits, a clean environment and a
temporary directory removed afterwards, but with the network and the rest of the file system
reachable; `isolation()` says which protections are active, and the evaluation records it.

This file is also the child's launcher: `python -I sandbox.py SETTINGS` (standard library only).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

NOBODY = 65534
_SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")


@dataclass
class Limits:
    """What a sandboxed program may use."""

    timeout: float = 3.0  # wall-clock seconds
    memory_mb: int = 1024  # address space
    processes: int = 32  # processes and threads it may create
    file_mb: int = 16  # largest file it may write
    open_files: int = 64


@dataclass
class Outcome:
    status: str  # "passed" (exit 0), "failed" (non-zero exit), "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def isolation() -> dict:
    """Which protections this machine allows: {"namespaces": bool, "drop_user": bool}."""
    namespaces = False
    if sys.platform.startswith("linux") and shutil.which("unshare"):
        try:
            namespaces = subprocess.run(_unshare() + ["true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            pass
    # Dropping to `nobody` needs the namespaces: the interpreter is bind-mounted where nobody can reach it.
    return {"namespaces": namespaces, "drop_user": namespaces and os.geteuid() == 0}


def _unshare() -> list[str]:
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run Python `source` confined; "passed" means it exited with status 0 within the time limit."""
    iso = isolation()
    scratch = None if iso["namespaces"] else tempfile.mkdtemp(prefix="mightylm-sandbox-")
    settings = {"cpu": int(limits.timeout) + 1, "memory": limits.memory_mb << 20, "processes": limits.processes,
                "file": limits.file_mb << 20, "files": limits.open_files,
                "prefix": sys.base_prefix, "python": os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
                "drop_user": iso["drop_user"], "namespaces": iso["namespaces"], "workdir": scratch}
    command = [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(settings)]
    if iso["namespaces"]:
        command = _unshare() + command
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch or "/tmp"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, start_new_session=True, cwd=scratch or "/")
    try:
        out, err = proc.communicate(source.encode("utf-8", "replace"), timeout=limits.timeout)
        status = "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, err = proc.communicate()
        status = "timeout"
    finally:
        _kill(proc)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return Outcome(status, None if status == "timeout" else proc.returncode, _tail(out), _tail(err),
                   time.perf_counter() - t0)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child's session; with namespaces, the child's death also ends its whole PID namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(data: bytes, n: int = 4000) -> str:
    return data[-n:].decode("utf-8", "replace")


# ---- the child: runs as `python -I -S sandbox.py SETTINGS`, first process of its namespaces ----


def _child(settings: dict) -> None:
    import ctypes
    import resource

    source = sys.stdin.buffer.read()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    if settings["namespaces"]:
        libc = ctypes.CDLL(None, use_errno=True)
        _private_scratch(libc)
        python = _reachable_python(libc, settings["prefix"], settings["python"])
        _read_only_elsewhere(libc)
        workdir = "/tmp/work"
        os.mkdir(workdir)
    else:
        workdir, python = settings["workdir"], settings["python"]
    program = os.path.join(workdir, "program.py")
    with open(program, "wb") as f:
        f.write(source)
    limits = {resource.RLIMIT_CPU: settings["cpu"], resource.RLIMIT_AS: settings["memory"],
              resource.RLIMIT_NPROC: settings["processes"], resource.RLIMIT_FSIZE: settings["file"],
              resource.RLIMIT_NOFILE: settings["files"], resource.RLIMIT_CORE: 0}
    if settings["drop_user"]:
        os.chown(workdir, NOBODY, NOBODY)
        os.chown(program, NOBODY, NOBODY)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    else:
        # Without a user of its own, the process limit counts the processes this user already has.
        limits[resource.RLIMIT_NPROC] += _processes_of(os.getuid())
    for what, value in limits.items():
        resource.setrlimit(what, (value, value))
    os.chdir(workdir)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "PYTHONDONTWRITEBYTECODE": "1"}
    os.execve(python, [python, "-I", program], env)


def _private_scratch(libc) -> None:
    for path in _SCRATCH:
        if os.path.isdir(path) and libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, b"size=64m,mode=1777") != 0:
            raise OSError(ctypes_errno(), f"mounting a private tmpfs on {path}")


def _reachable_python(libc, prefix: str, python: str) -> str:
    """Bind the interpreter's installation to /tmp/.python (read-only), so `nobody` can run it from
    wherever it lives (e.g. under /root). Returns the interpreter's path there."""
    if not python.startswith(prefix.rstrip("/") + "/"):
        return python
    target = "/tmp/.python"
    os.mkdir(target)
    if libc.mount(prefix.encode(), target.encode(), None, 4096 | 16384, None) != 0:  # MS_BIND | MS_REC
        raise OSError(ctypes_errno(), f"bind-mounting {prefix}")
    return target + python[len(prefix.rstrip("/")):]


def _read_only_elsewhere(libc) -> None:
    """Remount every mount but the scratch ones and the kernel's pseudo file systems read-only."""
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        point, options = fields[4], fields[5].split(",")
        if point in _SCRATCH or point.startswith(("/proc", "/sys", "/dev")):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
        flags |= MS_NOEXEC if "noexec" in options else 0
        libc.mount(None, point.encode(), None, flags, None)  # best effort: a locked mount stays as it was


def ctypes_errno() -> int:
    import ctypes

    return ctypes.get_errno()


def _processes_of(uid: int) -> int:
    count = 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                count += 1
        except OSError:
            pass
    return count


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
