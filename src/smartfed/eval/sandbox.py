"""Run untrusted Python (model-written programs, benchmark tests) in a separate, limited process.

``run_python(code)`` never runs ``code`` in this interpreter. It starts the same
Python (``sys.executable``) as a child process and returns a ``SandboxResult``
whose ``isolation`` says which of the two isolations below held it.

**bubblewrap** (``isolation="bwrap"``), used wherever ``bwrap`` is installed and
a probe run of it can create its namespaces (checked once per process,
``sandbox_isolation()``). The program runs in new user, PID, network, IPC, UTS,
mount and cgroup namespaces (``--unshare-all``) with every capability dropped
(``--cap-drop ALL``, and bubblewrap sets ``no_new_privs``):

* the whole file system is mounted **read-only** except the program's own
  folder (bound read-write); ``/tmp`` is an empty private tmpfs, ``/dev`` a
  minimal private one and ``/proc`` the new PID namespace's. Nothing the
  program does from inside (native code, ``sqlite3``, a subprocess, an audit
  hook switched off through ``gc``) can write outside its folder;
* the program's process tree lives in its own **PID namespace**: when the
  program exits, is killed at the timeout, or ``run_python``'s process dies
  (``--die-with-parent``), the kernel kills every process left in it, including
  children that called ``setsid`` or double-forked;
* no network but a private loopback (``--share-net`` when
  ``network_namespace=False``); a new session (``--new-session``), so it cannot
  push input into the caller's terminal.

**The fallback** (``isolation="fallback"``), where bubblewrap is missing or its
namespaces cannot be created (some containers): the layers below, which hold
against ordinary mistakes, but the audit hook can be switched off from inside
and a child that calls ``setsid`` escapes the process-group kill.

In both cases, from the strongest to the weakest:

* **A network namespace** (fallback: ``unshare -n``, or ``unshare -r -n``
  through a user namespace when plain ``unshare -n`` is not permitted): the
  child has no network interface but a loopback that is down, so even
  ``127.0.0.1`` of the caller is unreachable, whatever the code does (ctypes
  included). ``network_isolation()`` says which applies.
* **An audit hook** (PEP 578) installed by a guard prologue before the code runs.
  It refuses every ``socket.*`` event (creating, connecting, binding a socket,
  resolving a name), every process spawn (``os.system``, ``subprocess.Popen``,
  ``os.exec*``, ``os.fork``, ``os.posix_spawn``), ``resource.setrlimit``/``prlimit``
  (a root child could raise its own limits again), ``sqlite3.connect`` to a file
  outside the folder, and every file write, rename, removal or mode change
  outside the sandbox folder (``/dev/null`` excepted). It is Python-level state:
  the program can reach it (``gc``) and switch it off, and native code bypasses
  it; it is the only file-system guard of the fallback, and gives clear
  ``PermissionError: sandbox: ...`` messages under bubblewrap.
* **Resource limits** set in ``preexec_fn``: ``RLIMIT_AS`` (``memory_mb``),
  ``RLIMIT_CPU`` (the timeout rounded up, plus one second), ``RLIMIT_FSIZE``
  (``file_mb``), ``RLIMIT_CORE`` 0, and ``RLIMIT_NPROC`` (this user's current
  process count plus ``SANDBOX_EXTRA_PROCS``) when not running as root, since
  root is exempt from it.
* **A fresh temporary folder** as the working directory, ``HOME`` and
  ``TMPDIR``, removed afterwards, and a minimal environment.
* **A wall-clock timeout**: the child leads its own process group (a new
  session), and the whole group is killed (``SIGKILL``) on timeout and after
  every run (under bubblewrap this takes the PID namespace with it).
* **Isolated interpreter flags** ``-I -S -B``: no ``PYTHON*`` variables, no user
  site-packages, no ``site`` module (so no ``sitecustomize``/``usercustomize``
  and no ``.pth`` hooks; the parent's site-packages folders are put on
  ``sys.path`` by hand so that installed packages still import), no ``.pyc``
  writes.

What is **not** isolated: the file system can still be *read* with the rights
of the user running this process (under bubblewrap too: the view is read-only,
not hidden). For secrets on the machine, run the evaluation in a container or VM.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache

SANDBOX_EXTRA_PROCS = 16
"""Processes the child may add to its user's current count (RLIMIT_NPROC, non-root only)."""

_READ_CHUNK = 65536
_KILL_GRACE_S = 2.0

_MAIN_FILE = "main.py"

# The guard prologue, run with ``-c`` in the child before the user's program
# (which sits in main.py of the sandbox folder). ``__SITE_PATHS__`` is replaced
# by the parent's site-packages folders.
_PROLOGUE = r"""
import os, sys
sys.path.extend(__SITE_PATHS__)
sys.dont_write_bytecode = True
_root = os.path.realpath(os.getcwd())
_allowed = (_root, "/dev/null")
_spawn = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.startfile", "subprocess.Popen", "pty.spawn", "resource.setrlimit", "resource.prlimit",
})
_fs_one = frozenset({
    "os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
    "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr", "shutil.rmtree",
})
_fs_two = frozenset({"os.rename", "os.link", "os.symlink"})
_write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_realpath, _fspath, _sep, _startswith = os.path.realpath, os.fsdecode, os.sep, str.startswith
from urllib.parse import unquote as _unquote


def _inside(path):
    if isinstance(path, int):
        return True  # an open descriptor: it passed this check when it was opened
    try:
        real = _realpath(_fspath(path))
    except (TypeError, ValueError):
        return False
    return any(real == a or _startswith(real, a + _sep) for a in _allowed)


def _guard(event, args):
    if _startswith(event, "socket."):
        raise PermissionError(f"sandbox: network access is blocked ({event})")
    if event in _spawn:
        raise PermissionError(f"sandbox: {event} is blocked")
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(flags, int) and flags & _write_flags) or (
            isinstance(mode, str) and any(c in mode for c in "wax+")
        )
        if writes and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox folder is blocked")
    elif event in _fs_one or event in _fs_two:
        paths = args[:2] if event in _fs_two else args[:1]
        if event == "os.symlink":
            paths = args[1:2]  # the link is created at dst; its target is checked when opened
        for path in paths:
            if path is not None and not _inside(path):
                raise PermissionError(f"sandbox: {event} on {path!r} outside the sandbox folder is blocked")
    elif event == "sqlite3.connect":
        database = _fspath(args[0]) if args and args[0] is not None else ""
        if _startswith(database, "file:"):  # a URI: drop the authority and the query, decode %XX as sqlite does
            database = database[5:].split("?", 1)[0].split("#", 1)[0]
            if _startswith(database, "//"):
                database = database[2:]
                database = database[database.find("/"):] if "/" in database else ""
            database = _unquote(database)
        if database not in ("", ":memory:") and not _inside(database):
            raise PermissionError(f"sandbox: sqlite3 database {database!r} outside the sandbox folder is blocked")


sys.addaudithook(_guard)
del _guard
import runpy
sys.argv = [__MAIN__]
runpy.run_path(__MAIN__, run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run did.

    Attributes:
        ok: the program exited with status 0 before the timeout.
        returncode: the exit status; negative for a signal (``-9`` killed); None
            when the process could not be started.
        stdout, stderr: the output, decoded as UTF-8 (bad bytes replaced), each
            cut to ``max_output`` characters with a note appended when longer.
        timed_out: the wall-clock timeout ran out and the process group was killed.
        reason: ``""`` when ok, else one short phrase: ``"timeout"``,
            ``"memory limit"`` (MemoryError), ``"cpu time limit"`` (SIGXCPU),
            ``"file size limit"`` (SIGXFSZ), ``"killed by SIGKILL"``,
            ``"blocked by the sandbox"`` (a PermissionError from the guard),
            ``"exit status N"``, or ``"could not start: ..."``.
        truncated: stdout or stderr was cut.
        isolation: ``"bwrap"`` (bubblewrap's namespaces and read-only file system)
            or ``"fallback"`` (audit hook, process group, rlimits, ``unshare -n``):
            see the module docstring.
    """

    ok: bool
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    reason: str
    truncated: bool = False
    isolation: str = ""


@lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
    """The command prefix that puts the child in a new network namespace, or () when none works."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "-n"), (unshare, "-r", "-n")):
        try:
            probe = subprocess.run(
                [*prefix, sys.executable, "-I", "-S", "-c", "pass"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def _bwrap_argv(bwrap: str, workdir: str, *, share_net: bool) -> list[str]:
    """bubblewrap's command prefix for a program whose folder is ``workdir`` (see the module docstring)."""
    argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    # the private /tmp must not hide this Python or its packages (a virtualenv under /tmp)
    tmp = os.path.realpath("/tmp")
    for path in dict.fromkeys([sys.prefix, sys.base_prefix, *_site_paths()]):
        real = os.path.realpath(path)
        if real == tmp or real.startswith(tmp + os.sep):
            argv += ["--ro-bind", real, real]
    argv += ["--bind", workdir, workdir, "--chdir", workdir, "--unshare-all"]
    if share_net:
        argv.append("--share-net")
    # --cap-drop ALL matters when the caller is root: the sandbox's root then holds no capability
    return [*argv, "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--"]


@lru_cache(maxsize=1)
def _bwrap() -> str | None:
    """The bwrap program when it is installed and a probe run of it works here, else None (checked once)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    probe_dir = tempfile.mkdtemp(prefix="smartfed-sandbox-probe-")
    try:
        # the probe writes in its folder, as a program does: a bind that silently fails shows here
        argv = [*_bwrap_argv(bwrap, probe_dir, share_net=False), sys.executable, "-I", "-S", "-c", "open('ok', 'w')"]
        probe = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=10, check=False, cwd=probe_dir
        )
        works = probe.returncode == 0 and os.path.isfile(os.path.join(probe_dir, "ok"))
    except (OSError, subprocess.SubprocessError):
        works = False
    finally:
        _remove_tree(probe_dir)
    return bwrap if works else None


def sandbox_isolation() -> str:
    """Which isolation ``run_python`` uses here by default: ``"bwrap"`` or ``"fallback"``."""
    return "bwrap" if _bwrap() else "fallback"


def network_isolation() -> str:
    """Which network protection ``run_python`` applies here.

    ``"bwrap"`` (bubblewrap's network namespace), ``"netns"`` (``unshare -n``),
    ``"netns+userns"`` (``unshare -r -n``), or ``"audit-hook"`` (no namespace
    available: the guard's audit hook alone). The audit hook is installed in
    every case.
    """
    if _bwrap():
        return "bwrap"
    prefix = _netns_prefix()
    if not prefix:
        return "audit-hook"
    return "netns+userns" if "-r" in prefix else "netns"


def _site_paths() -> list[str]:
    paths = []
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path and path not in paths and os.path.isdir(path):
            paths.append(path)
    return paths


def _user_process_count() -> int:
    uid, count = os.getuid(), 0
    with contextlib.suppress(OSError), os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    count += entry.stat(follow_symlinks=False).st_uid == uid
    return count


def _limits(timeout: float, memory_mb: int, file_mb: int) -> list[tuple[int, int]]:
    cpu = math.ceil(timeout) + 1
    limits = [
        (resource.RLIMIT_AS, memory_mb * 1024 * 1024),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, file_mb * 1024 * 1024),
        (resource.RLIMIT_CORE, 0),
    ]
    if os.getuid() != 0 and hasattr(resource, "RLIMIT_NPROC"):
        limits.append((resource.RLIMIT_NPROC, _user_process_count() + SANDBOX_EXTRA_PROCS))
    return limits


def _make_preexec(limits: list[tuple[int, int]]):  # type: ignore[no-untyped-def]
    def preexec() -> None:  # runs in the child between fork and exec: only setrlimit calls
        for which, value in limits:
            hard = resource.getrlimit(which)[1]
            soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
            new_hard = soft + 1 if which == resource.RLIMIT_CPU else soft  # SIGXCPU first, then SIGKILL
            if hard != resource.RLIM_INFINITY:
                new_hard = min(new_hard, hard)
            resource.setrlimit(which, (soft, new_hard))

    return preexec


class _Capped:
    """Reads a pipe to its end in a thread, keeping the first ``limit`` bytes."""

    def __init__(self, stream, limit: int) -> None:  # type: ignore[no-untyped-def]
        self.stream, self.limit = stream, limit
        self.kept = bytearray()
        self.total = 0
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while chunk := self.stream.read1(_READ_CHUNK):
                self.total += len(chunk)
                room = self.limit - len(self.kept)
                if room > 0:
                    self.kept += chunk[:room]

    def text(self, max_chars: int) -> tuple[str, bool]:
        text = self.kept.decode("utf-8", errors="replace")
        cut = self.total > self.limit or len(text) > max_chars
        if cut:
            text = text[:max_chars] + f"\n... [output truncated: {self.total} bytes in all]"
        return text, cut


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _bwrap_returncode(returncode: int) -> int:
    """bubblewrap exits with 128 + N when the program died of signal N: give it back as -N, as Popen does."""
    if 128 < returncode < 128 + signal.NSIG:
        return -(returncode - 128)
    return returncode


def _reason(returncode: int, stderr: str) -> str:
    if returncode == 0:
        return ""
    if returncode < 0:
        signum = -returncode
        if signum == signal.SIGXCPU:
            return "cpu time limit"
        if signum == signal.SIGXFSZ:
            return "file size limit"
        try:
            return f"killed by {signal.Signals(signum).name}"
        except ValueError:
            return f"killed by signal {signum}"
    tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if tail.startswith("MemoryError"):
        return "memory limit"
    if tail.startswith("PermissionError: sandbox:"):
        return "blocked by the sandbox"
    return f"exit status {returncode}"


def _remove_tree(path: str) -> None:
    """``rmtree`` after giving the owner rwx back on every folder: the program may have chmod-ed one to 000.

    Symlinks are never followed (os.walk lists a link to a folder among the folders;
    chmod would follow it out of the sandbox).
    """
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            sub = os.path.join(root, name)
            if not os.path.islink(sub):
                with contextlib.suppress(OSError):
                    os.chmod(sub, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _check_positive(name: str, value: object, kinds: tuple[type, ...] = (int,)) -> None:
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"run_python: {name}={value!r} must be a positive finite number")


def run_python(
    code: str,
    *,
    timeout: float = 5.0,
    memory_mb: int = 512,
    max_output: int = 10_000,
    file_mb: int = 16,
    network_namespace: bool = True,
    isolation: str = "auto",
) -> SandboxResult:
    """Run ``code`` as a Python program in a separate, limited process (see the module docstring).

    Args:
        code: the program's source; it runs as ``__main__`` from ``main.py`` in a
            fresh temporary folder (its working directory), removed afterwards.
        timeout: wall-clock seconds before the whole process group is killed;
            CPU time is limited to ``ceil(timeout) + 1`` seconds as well.
        memory_mb: address-space limit (``RLIMIT_AS``) in MiB.
        max_output: characters kept of stdout and of stderr each (the rest is
            read and dropped, so a chatty program never blocks on a full pipe).
        file_mb: the largest file the program may write (``RLIMIT_FSIZE``), MiB.
        network_namespace: a network namespace (bubblewrap's, or ``unshare -n``
            in the fallback; see ``network_isolation()``); False leaves only the
            audit hook guarding the network.
        isolation: ``"auto"`` (bubblewrap where it works, else the fallback),
            ``"bwrap"`` (an error where it does not work) or ``"fallback"``.

    Returns:
        A ``SandboxResult``; a program that fails, times out or is killed gives
        ``ok=False`` with a ``reason``, never an exception.

    Raises:
        ValueError: ``code`` is not a string, a limit is not positive, or
            ``isolation`` is unknown or ``"bwrap"`` where bubblewrap does not work.
    """
    if not isinstance(code, str):
        raise ValueError(f"run_python: code must be a string, got {type(code).__name__}")
    if isolation not in ("auto", "bwrap", "fallback"):
        raise ValueError(f"run_python: isolation={isolation!r} must be 'auto', 'bwrap' or 'fallback'")
    bwrap = _bwrap() if isolation in ("auto", "bwrap") else None
    if isolation == "bwrap" and bwrap is None:
        raise ValueError(
            "run_python: isolation='bwrap' but bubblewrap is not installed or cannot create namespaces here"
        )
    used = "bwrap" if bwrap else "fallback"
    _check_positive("timeout", timeout, (int, float))
    _check_positive("memory_mb", memory_mb)
    _check_positive("max_output", max_output)
    _check_positive("file_mb", file_mb)
    workdir = tempfile.mkdtemp(prefix="smartfed-sandbox-")
    try:
        with open(os.path.join(workdir, _MAIN_FILE), "w", encoding="utf-8") as handle:
            handle.write(code)
        prologue = _PROLOGUE.replace("__SITE_PATHS__", repr(_site_paths())).replace("__MAIN__", repr(_MAIN_FILE))
        argv = [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", prologue]
        if bwrap:
            argv = [*_bwrap_argv(bwrap, workdir, share_net=not network_namespace), *argv]
        elif network_namespace:
            argv = [*_netns_prefix(), *argv]
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        try:
            process = subprocess.Popen(
                argv,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_make_preexec(_limits(timeout, memory_mb, file_mb)),
                close_fds=True,
            )
        except OSError as err:
            return SandboxResult(False, None, "", "", False, f"could not start: {err}", isolation=used)
        limit_bytes = 4 * max_output + 4  # UTF-8: at most 4 bytes a character
        out, err_ = _Capped(process.stdout, limit_bytes), _Capped(process.stderr, limit_bytes)
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(process.pid)  # the program's own children too, on timeout or not
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=_KILL_GRACE_S)
            out.thread.join(_KILL_GRACE_S)
            err_.thread.join(_KILL_GRACE_S)
            for stream in (process.stdout, process.stderr):
                with contextlib.suppress(OSError):
                    stream.close()
        stdout, cut_out = out.text(max_output)
        stderr, cut_err = err_.text(max_output)
        returncode = process.returncode
        if bwrap and returncode is not None:
            returncode = _bwrap_returncode(returncode)
        reason = "timeout" if timed_out else _reason(returncode, stderr)
        return SandboxResult(
            ok=not timed_out and returncode == 0,
            returncode=returncode,
            stdout=stdout,
            stderr=stderr,
            timed_out=timed_out,
            reason=reason,
            truncated=cut_out or cut_err,
            isolation=used,
        )
    finally:
        _remove_tree(workdir)
