"""`diffusion-api serve` as the parent of everything the service starts, so that stopping it stops them all.

`serve run` (Ray's CLI) starts a local Ray cluster; in Ray Serve's high-throughput mode a Ray worker (the
HAProxyManager actor) runs HAProxy in front of the replicas. Ray cleans that up when it shuts down in order,
but not when its raylet dies first (a SIGTERM or SIGKILL to the whole tree, a crash, the OOM killer): the
workers exit on their own and HAProxy is left behind, re-parented to init, holding the HTTP port and
answering 500, so the next start cannot bind. Hence:

- `serve run` runs as a child in its own process group, so a signal to the supervisor's group (Ctrl-C in a
  terminal, `kill -- -PGID`) reaches only the supervisor, which then stops the service in order: SIGTERM to
  `serve run`, whose Ray driver then shuts its cluster down (the raylet stops its workers and their
  children, HAProxy among them), and after `stop_timeout_s`, or at a second signal, SIGTERM then SIGKILL to
  every process left. SIGTERM, SIGINT and SIGHUP all do this. (Not SIGINT to `serve run`: its Ctrl-C path
  calls `serve.shutdown()`, which in this mode drains the ingress for at least 30 s,
  RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, longer than `docker stop` waits. Requests in flight are
  cut; the jobs stay in the job store.)
- The supervisor is a child subreaper (Linux): a process of the tree whose parent dies (HAProxy when its Ray
  worker dies) is re-parented to it rather than to init, so it is still found, and stopped, as a descendant.
- `serve run` gets SIGTERM if the supervisor itself dies (a SIGKILL cannot be caught): Ray still shuts
  down in order.
- HAProxy's files go to a folder of this service's own (`/tmp/dapi-haproxy-<uid>`, unless Ray's
  `RAY_SERVE_HAPROXY_*` variables name others), held by a lock while the service runs. At start, with the
  lock taken, an HAProxy whose `-f` config file is in that folder is one left by an earlier run that
  crashed: it is stopped. Processes are identified by that config path only, never by name, so any other
  HAProxy on the machine is left alone.
"""

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
import yaml

# Ray's variables for HAProxy's files -> the file name in this service's folder. Ray puts each file in a
# per-node folder under the variable's folder: `<folder>/<node id>/haproxy.cfg`.
HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}
HAPROXY_STATE_BASE = "RAY_SERVE_HAPROXY_SERVER_STATE_BASE"
# HAProxy's own ports (Ray's defaults), on every interface.
HAPROXY_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}
# Serve's Python proxy, HAProxy's backup backend, on the HTTP host. Two services on one machine must not
# share it: one's HAProxy would answer with the other's application.
FALLBACK_PORT = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", 8500)
LOCK_NAME = "diffusion-api-serve.lock"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
REPEAT_SIGNAL_S = 1.0  # a second stop signal within this is the first one again, not "stop at once"
KILL_GRACE_S = 5.0  # SIGTERM -> SIGKILL for the processes left once `serve run` is gone or out of time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


class ServiceStartError(Exception):
    """The service cannot start: another `diffusion-api serve` holds its HAProxy folder, a port it needs is
    taken, or its config does not say which port."""


def default_haproxy_folder() -> Path:
    # Short and fixed (not $TMPDIR): HAProxy refuses socket paths (`<folder>/<56-char node id>/metrics.sock`)
    # over 97 characters.
    return Path("/tmp") / f"dapi-haproxy-{os.getuid()}"


def haproxy_environment(environ: dict[str, str]) -> dict[str, str]:
    """Ray's HAProxy file variables that `environ` leaves unset, pointed into this service's folder."""
    folder = default_haproxy_folder()
    missing = {name: str(folder / file) for name, file in HAPROXY_FILES.items() if not environ.get(name)}
    if not environ.get(HAPROXY_STATE_BASE):
        missing[HAPROXY_STATE_BASE] = str(folder)
    return missing


def haproxy_config(environ: dict[str, str]) -> tuple[Path, str]:
    """The folder holding the per-node HAProxy config folders, and the config file's name."""
    path = Path(os.path.abspath(environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]))
    return path.parent, path.name


def is_own_haproxy(cmdline: list[str], folder: Path, config_name: str) -> bool:
    """Whether a command line is an HAProxy that Ray started for this service: `-f <folder>/<node>/<name>`."""
    for flag, value in zip(cmdline, cmdline[1:], strict=False):
        if flag == "-f":
            path = Path(os.path.abspath(value))
            if path.name == config_name and path.parent.parent == folder:
                return True
    return False


def find_own_haproxies(folder: Path, config_name: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if cmdline and is_own_haproxy(cmdline, folder, config_name):
            found.append(process)
    return found


def stop_processes(processes: Iterable[psutil.Process], grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM, then SIGKILL to whatever is still running after `grace_s`."""
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
            alive.append(process)
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_s)


class ServiceLock:
    """An exclusive lock on this service's HAProxy folder, held while the service runs (released by the kernel
    when the supervisor exits, however it exits); the file names the holder's pid."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self._file = None

    def acquire(self) -> None:
        folder = self.path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.stat().st_uid != os.getuid():  # /tmp is shared: never use a folder another user made
            raise ServiceStartError(
                f"{folder} belongs to another user; set RAY_SERVE_HAPROXY_CONFIG_FILE_LOC and the other "
                f"RAY_SERVE_HAPROXY_* file variables to a folder of yours"
            )
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise ServiceStartError(
                f"another 'diffusion-api serve' (pid {holder}) is running with the HAProxy files in "
                f"{self.path.parent}; stop it first, or give this one its own files and ports with Ray's "
                f"RAY_SERVE_HAPROXY_* variables (RAY_SERVE_HAPROXY_CONFIG_FILE_LOC, ..._STATS_PORT, ...)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def service_ports(config: Path, environment: dict[str, str]) -> dict[str, tuple[str, int]]:
    """The ports the service binds on this machine: the Serve config's HTTP port (HAProxy listens on it; on
    every interface unless the config names a host, as Ray does in this mode), Serve's fallback proxy port on
    the same host, and HAProxy's stats and metrics ports (every interface)."""
    try:
        http = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("http_options") or {}
        host = str(http.get("host") or "0.0.0.0")
        ports = {"http_options.port": (host, int(http.get("port") or 8000))}
        ports[FALLBACK_PORT[0]] = (host, int(environment.get(FALLBACK_PORT[0]) or FALLBACK_PORT[1]))
        for name, default in HAPROXY_PORTS.items():
            ports[name] = ("0.0.0.0", int(environment.get(name) or default))
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as error:
        raise ServiceStartError(f"cannot read the HTTP port from {str(config)!r}: {error}") from error
    return ports


def check_ports(ports: dict[str, tuple[str, int]]) -> None:
    """Refuses to start when a port the service binds is taken (`serve run` would start, and HAProxy fail)."""
    for what, (host, port) in ports.items():
        if port_in_use(host, port):
            raise ServiceStartError(f"port {port} ({what}) on {host} is in use by another program")


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) == 0
    except (AttributeError, OSError):  # not Linux
        return False


def _spawn(argv: list[str], env: dict[str, str], cwd: Path, mask: set) -> int:
    """fork + exec `argv` in a process group of its own, with stdin from /dev/null, the signal mask the
    supervisor had, and SIGTERM when the supervisor dies."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the supervisor died before the line above
                os._exit(1)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            # Default dispositions (a shell's background job ignores SIGINT; Python ignores SIGPIPE).
            for number in (signal.SIGPIPE, *STOP_SIGNALS):
                signal.signal(number, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        except BaseException as error:
            os.write(2, f"diffusion-api: cannot run {argv[0]}: {error}\n".encode())
        finally:
            os._exit(127)
    with contextlib.suppress(OSError):  # also here, so a signal sent right after the fork finds its group
        os.setpgid(pid, pid)
    return pid


def _descendants(me: psutil.Process, others: set[int]) -> list[psutil.Process]:
    """The service's processes: every descendant (orphans re-parented to the subreaper included), but the
    children the caller had before and theirs."""
    found = []
    for child in me.children():
        if child.pid not in others:
            with contextlib.suppress(psutil.NoSuchProcess):
                found += [child, *child.children(recursive=True)]
    return found


def _reap(child: int) -> int | None:
    """Collects every exited child (adopted orphans too); `child`'s exit code when it is among them."""
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return code
        if pid == 0:
            return code
        if pid == child:
            code = os.waitstatus_to_exitcode(status)


def supervise(
    argv: list[str],
    env: dict[str, str],
    cwd: Path,
    *,
    haproxy_folder: Path,
    haproxy_config_name: str,
    stop_timeout_s: float,
    notify: Callable[[str], None],
) -> int | None:
    """Runs `argv` until it exits or a stop signal comes, then stops every process of the tree. Returns the
    child's exit code when it exited by itself, None when a signal stopped the service."""
    watched = {*STOP_SIGNALS, signal.SIGCHLD}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)  # taken with sigtimedwait: no handler races
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    me = psutil.Process()
    others = {process.pid for process in me.children()}  # children of the caller's own (when not a CLI)
    stopping_since: float | None = None
    code: int | None = None
    try:
        child = _spawn(argv, env, cwd, mask)
        while True:
            info = signal.sigtimedwait(watched, 1.0)
            code = _reap(child)
            if code is not None:
                break
            if info is not None and info.si_signo in STOP_SIGNALS:
                if stopping_since is not None:
                    if time.monotonic() - stopping_since < REPEAT_SIGNAL_S:
                        continue  # the same stop, delivered twice (to a process group through `make`, say)
                    notify("stopping the service's processes now")
                    break
                notify(f"{signal.Signals(info.si_signo).name}: stopping the service (again to stop it at once)")
                stopping_since = time.monotonic()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGTERM)  # Ray's driver: ray.shutdown(), which stops its cluster
            elif stopping_since is not None and time.monotonic() - stopping_since > stop_timeout_s:
                notify(f"the service did not stop within {stop_timeout_s:g}s: stopping its processes")
                break
    finally:
        left = _descendants(me, others)
        if left:
            stop_processes(left)
        _reap(-1)
        strays = find_own_haproxies(haproxy_folder, haproxy_config_name)  # where the tree lost them
        if strays:
            stop_processes(strays)
        _prctl(_PR_SET_CHILD_SUBREAPER, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return None if stopping_since is not None else code


def clear_stale_haproxies(folder: Path, config_name: str, notify: Callable[[str], None]) -> int:
    """Stops the HAProxy processes an earlier run of this service left (call it with the lock held: then no
    running service owns them). Returns how many there were."""
    stale = find_own_haproxies(folder, config_name)
    for process in stale:
        with contextlib.suppress(psutil.Error):
            notify(f"stopping a stale HAProxy left by an earlier run (pid {process.pid}): "
                   f"{' '.join(process.cmdline())}")  # fmt: skip
    stop_processes(stale)
    return len(stale)
