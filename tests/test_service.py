"""The daemon as a service: systemd notifications and the metrics a running daemon serves."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from harness import (
    Conn,
    Daemon,
    control,
    handoff_doc,
    host_pids,
    kill_group,
    start_worker,
    wait_for,
    write_config,
)

from orchestrator import config as config_file

pytestmark = pytest.mark.slow


def test_sd_notify_ready_watchdog_and_stopping(tmp_path: Path, repo: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(60)
    env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
    daemon = Daemon(write_config(tmp_path, repo), tmp_path / "daemon.log", env=env).start()
    try:
        messages: list[str] = []

        def received(word: str) -> bool:
            while not any(word in m for m in messages):
                messages.append(listener.recv(4096).decode())
            return True

        received("READY=1")
        assert any(f"STATUS=serving on {daemon.socket}" in m for m in messages)
        received("WATCHDOG=1")
    finally:
        daemon.stop()
    received("STOPPING=1")
    listener.close()


def test_a_running_daemon_serves_its_metrics(tmp_path: Path, repo: Path) -> None:
    gates = f'[[gates]]\nname = "tests"\nrun = ["{sys.executable}", "-c", "pass"]\n'
    config = write_config(tmp_path, repo, gates=gates, metrics="127.0.0.1:0")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        # The socket accepts a moment before daemon_ready is logged: wait for the line.
        ready = wait_for(
            lambda: [e for e in daemon.logs() if e["event"] == "daemon_ready"], "daemon_ready"
        )
        port = ready[0]["metrics_port"]
        base = f"http://127.0.0.1:{port}"
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("measured")]})
        wait_for(lambda: control(daemon.socket, "handoff.get", {"name": "measured"})["state"]
                 == "merged", "the merge")

        def scrape() -> str:
            with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
                return str(response.read().decode())

        def settled() -> str | None:
            text = scrape()
            return text if 'orchestrator_handoffs{state="merged"} 1.0' in text else None

        text = wait_for(settled, "the gauges to catch up")
        assert 'orchestrator_merges_total{result="merged"} 1.0' in text
        assert "orchestrator_workers_connected 1.0" in text
        assert "orchestrator_leases_active 0.0" in text
        assert "orchestrator_merge_queue_depth 0.0" in text
        assert 'orchestrator_gate_duration_seconds_count{gate="tests"} 1.0' in text
        assert "orchestrator_handoff_cycle_seconds_count 1.0" in text
        assert "orchestrator_build_info{version=" in text
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(base + path, timeout=10) as response:
                assert response.status == 200
        if shutil.which("promtool"):
            check = subprocess.run(["promtool", "check", "metrics"], input=text,
                                   capture_output=True, text=True, timeout=60)
            assert check.returncode == 0, check.stdout + check.stderr
    finally:
        kill_group(worker)
        daemon.stop()


def test_a_busy_metrics_port_is_a_clear_start_up_error(tmp_path: Path, repo: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, repo, metrics=f"127.0.0.1:{port}")
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator", "--config", str(config), "serve"],
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert 'set it to ""' in result.stderr


class NotifyListener:
    """What systemd is to the daemon: a datagram socket named in ``$NOTIFY_SOCKET``."""

    def __init__(self, tmp_path: Path, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"orchestrator-test-{os.getpid()}-{tmp_path.name}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            self.sock.bind(str(tmp_path / "notify.sock"))
            self.env_value = str(tmp_path / "notify.sock")
        self.messages: list[str] = []

    def wait_for(self, word: str, timeout: float = 60) -> str:
        """The first message (received from now on or before) containing ``word``."""
        for message in self.messages:
            if word in message:
                return message
        self.sock.settimeout(timeout)
        while True:
            message = self.sock.recv(4096).decode()
            self.messages.append(message)
            if word in message:
                return message

    def drain(self) -> None:
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_only_once_serving_watchdog_until_the_loop_wedges(
    tmp_path: Path, repo: Path, abstract: bool
) -> None:
    systemd = NotifyListener(tmp_path, abstract=abstract)
    config = write_config(tmp_path, repo)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": systemd.env_value,
        "WATCHDOG_USEC": "200000",
        "ORCHESTRATOR_TEST_HOOKS": "1",
    }
    log = tmp_path / "daemon.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--config", str(config), "serve"],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env,
    )
    try:
        ready = systemd.wait_for("READY=1")
        # READY=1 promises the socket accepts: connect at once, no retry.
        daemon_socket = Path(str(config.read_text()).split('socket = "')[1].split('"')[0])
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(daemon_socket))
        assert f"MAINPID={process.pid}" in ready
        for _ in range(3):
            systemd.messages.clear()
            systemd.wait_for("WATCHDOG=1")
        process.send_signal(signal.SIGUSR2)
        wait_for(lambda: "test_hook_wedging_event_loop" in log.read_text(), "the wedge")
        systemd.drain()
        systemd.sock.settimeout(2.0)  # ten watchdog intervals
        with pytest.raises(TimeoutError):
            while True:
                message = systemd.sock.recv(4096).decode()
                assert "WATCHDOG=1" not in message, "a wedged loop must not ping the watchdog"
    finally:
        process.kill()
        process.wait()
        systemd.close()


def test_status_line_follows_workers_and_queue(tmp_path: Path, repo: Path) -> None:
    systemd = NotifyListener(tmp_path)
    daemon = Daemon(
        write_config(tmp_path, repo), tmp_path / "daemon.log",
        env={"NOTIFY_SOCKET": systemd.env_value},
    ).start()
    worker = None
    try:
        systemd.wait_for("READY=1")
        worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
        systemd.wait_for("STATUS=1 workers")
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("status-line")]})
        systemd.wait_for("1 merged")
    finally:
        if worker is not None:
            kill_group(worker)
        assert daemon.stop() == 0
    assert "STOPPING=1" in systemd.wait_for("STOPPING=1")
    systemd.close()


def _activated_daemon(
    config: Path, listener: socket.socket, log: Path
) -> subprocess.Popen[bytes]:
    """Start ``serve`` as systemd would for orchestrator.socket: the listening socket on
    fd 3, ``LISTEN_FDS=1`` and ``LISTEN_PID`` naming the daemon itself (the small launcher
    execs the daemon, so its pid is the daemon's)."""
    fd = listener.fileno()
    launcher = (
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"
        f"os.close({fd})\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", launcher, "-m", "orchestrator", "--config", str(config), "serve"],
        pass_fds=(fd,), stdout=log.open("ab"), stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def test_socket_activation_serves_the_inherited_socket_and_queues_across_restarts(
    tmp_path: Path, repo: Path
) -> None:
    config = write_config(tmp_path, repo, metrics="127.0.0.1:0")
    path = Path(config.read_text().split('socket = "')[1].split('"')[0])
    path.parent.mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    log = tmp_path / "daemon.log"
    first = _activated_daemon(config, listener, log)
    try:
        ready = wait_for(lambda: _events(log, "daemon_ready"), "the daemon to take the socket")
        # Ready on an inherited socket too: /readyz counts it as listening.
        readyz = f"http://127.0.0.1:{ready[0]['metrics_port']}/readyz"
        with urllib.request.urlopen(readyz, timeout=10) as response:
            assert response.status == 200
        assert "counts" in control(path, "status")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
        # The socket outlived the daemon, as systemd keeps it: the file is still there
        # and a client connecting now waits in the backlog instead of being refused.
        assert path.exists()
        waiting = Conn(path)
        second = _activated_daemon(config, listener, log)
        try:
            waiting.initialize("control")
            reply = waiting.request("status")
            assert "result" in reply, reply
        finally:
            waiting.close()
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0
    finally:
        for process in (first,):
            if process.poll() is None:
                process.kill()
        listener.close()
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    activated = [e for e in events if e["event"] == "socket_listening"]
    assert len(activated) == 2 and all(e.get("activated") for e in activated)


def _events(log: Path, name: str) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            out.append(event)
    return out


def test_sighup_applies_a_good_config_and_refuses_a_bad_one(tmp_path: Path, repo: Path) -> None:
    systemd = NotifyListener(tmp_path)
    gates = f'[[gates]]\nname = "tests"\nrun = ["{sys.executable}", "-c", "pass"]\n'
    config = write_config(tmp_path, repo, gates=gates, merge="paused = true")
    log = tmp_path / "daemon.log"
    daemon = Daemon(config, log, env={"NOTIFY_SOCKET": systemd.env_value}).start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("held")]})
        wait_for(lambda: control(daemon.socket, "handoff.get", {"name": "held"})["state"]
                 == "reported", "the report")
        assert control(daemon.socket, "status")["mergeBlocked"].startswith("merging is paused")

        # Resume merging, and also change a setting only a restart can apply.
        config.write_text(
            config.read_text().replace("paused = true", "paused = false")
            .replace("[daemon]\n", '[daemon]\nsocket_mode = "0600"\n')
        )
        systemd.messages.clear()
        daemon.process.send_signal(signal.SIGHUP)
        assert "MONOTONIC_USEC=" in systemd.wait_for("RELOADING=1")
        systemd.wait_for("READY=1")
        wait_for(lambda: control(daemon.socket, "handoff.get", {"name": "held"})["state"]
                 == "merged", "the merge once resumed")
        reloaded = _events(log, "config_reloaded")
        assert len(reloaded) == 1 and "merge_paused" in reloaded[0]["changed"]
        assert _events(log, "reload_needs_restart")[0]["settings"] == ["socket_mode"]

        good = config.read_text()
        config.write_text(good.replace("[merge]\n", '[merge]\nstrategy = "rebase"\n'))
        daemon.process.send_signal(signal.SIGHUP)
        refused = wait_for(lambda: _events(log, "reload_refused"), "the refusal")
        assert any("merge.strategy" in p for p in refused[0]["problems"])
        # The old configuration stays in force: work still merges.
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("after")]})
        wait_for(lambda: control(daemon.socket, "handoff.get", {"name": "after"})["state"]
                 == "merged", "a merge under the old config")
    finally:
        kill_group(worker)
        assert daemon.stop() == 0
        systemd.close()


def test_sigterm_with_a_lease_held_and_a_gate_running_loses_nothing(
    tmp_path: Path, repo: Path
) -> None:
    release = tmp_path / "release-gate"
    gate_code = (
        f"import os, time\nwhile not os.path.exists({str(release)!r}):\n    time.sleep(0.05)\n"
    )
    gates = f"[[gates]]\nname = \"slow\"\nrun = [{json.dumps(sys.executable)}, \"-c\", " \
        f"{json.dumps(gate_code)}]\n"
    config = write_config(tmp_path, repo, gates=gates)
    log = tmp_path / "daemon.log"
    daemon = Daemon(config, log).start()
    good = start_worker(daemon.socket, "good.py", tmp_path / "good.log", name="good",
                        extra=["--max-handoffs", "1"])
    hanging = None
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("gated")]})
        wait_for(lambda: control(daemon.socket, "handoff.get", {"name": "gated"})["state"]
                 == "gating", "the gate to start")
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("held")]})
        hanging = start_worker(daemon.socket, "hangs.py", tmp_path / "hang.log", name="hang")
        wait_for(lambda: control(daemon.socket, "handoff.get", {"name": "held"})["state"]
                 == "leased", "the lease")
        def held() -> list[tuple[str, str, str]]:
            leases = control(daemon.socket, "status")["leases"]
            # Tokens are shown to nobody but the holder, not even to an operator.
            assert all("token" not in lease for lease in leases)
            return [(lease["id"], lease["worker"], lease["handoff"]) for lease in leases]

        lease_before = held()
        assert daemon.stop() == 0

        daemon.start()
        # The lease survived the restart and its worker carries on with it.
        assert held() == lease_before
        wait_for(lambda: control(daemon.socket, "status")["workers"], "the worker to reconnect")
        release.write_text("")
        wait_for(lambda: control(daemon.socket, "handoff.get", {"name": "gated"})["state"]
                 == "merged", "the interrupted gate to run again and merge")
        assert control(daemon.socket, "handoff.get", {"name": "held"})["state"] == "leased"
        merges = subprocess.run(
            ["git", "log", "--first-parent", "--format=%s", "main"], cwd=repo,
            capture_output=True, text=True, check=True,
        ).stdout
        assert merges.count("Merge handoff gated:") == 1
    finally:
        kill_group(good)
        if hanging is not None:
            kill_group(hanging)
        daemon.stop()


def _alive(pid: int) -> bool:
    """Running, not a zombie (a dead child of a dead parent may wait for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pool_config(tmp_path: Path, repo: Path, *, count: int, name: str) -> Path:
    """A config whose ``[workers]`` pool runs the good agent."""
    config = write_config(tmp_path, repo)
    agent = Path(__file__).parent / "agents" / "good.py"
    command = json.dumps([sys.executable, str(agent)])
    config.write_text(
        config.read_text() + f'[workers]\ncount = {count}\nname = "{name}"\ncommand = {command}\n'
    )
    return config


def test_supervised_pool_runs_restarts_and_never_orphans_its_workers(
    tmp_path: Path, repo: Path
) -> None:
    log = tmp_path / "daemon.log"
    daemon = Daemon(_pool_config(tmp_path, repo, count=2, name="pool"), log).start()
    try:
        wait_for(lambda: len(control(daemon.socket, "status")["workers"]) == 2, "two workers")
        names = sorted(w["name"] for w in control(daemon.socket, "status")["workers"])
        assert names == ["pool-1", "pool-2"]
        docs = [handoff_doc(f"pooled-{i}") for i in range(3)]
        control(daemon.socket, "handoff.submit", {"markdown": docs})
        wait_for(lambda: set(states_of(daemon.socket).values()) == {"merged"}, "three merges")

        first = int(_events(log, "pool_worker_started")[0]["pid"])
        os.killpg(first, signal.SIGKILL)
        wait_for(lambda: len(_events(log, "pool_worker_started")) == 3, "a restart")
        assert _events(log, "pool_worker_exited")[0]["worker"] == "pool-1"
        wait_for(lambda: len(control(daemon.socket, "status")["workers"]) == 2, "two again")
        pids = [int(e["pid"]) for e in _events(log, "pool_worker_started")]
        assert daemon.stop() == 0
        assert not [pid for pid in pids if _alive(pid)], "SIGTERM stops every pool worker"

        daemon.start()
        wait_for(lambda: len(control(daemon.socket, "status")["workers"]) == 2, "the pool back")
        pids = [int(e["pid"]) for e in _events(log, "pool_worker_started")[3:]]
        daemon.kill()
        wait_for(lambda: not [pid for pid in pids if _alive(pid)],
                 "the pool to die with a SIGKILLed daemon")
    finally:
        daemon.stop()


def states_of(path: Path) -> dict[str, str]:
    return {h["name"]: h["state"] for h in control(path, "handoff.list")["handoffs"]}


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ("count = 2", "workers.command is required when workers.count > 0"),
        ("count = -1\ncommand = ['a']", "workers.count must be from 0 to 256"),
        ("count = 1\ncommand = [1]", "workers.command must be the agent's argv"),
        ("count = 1\ncommand = ['a']\nlabels = ['']", "workers.labels must be a list"),
        ("count = 1\ncommand = ['a']\nname = 'a b'", "workers.name must be letters"),
        ("count = 1\ncommand = ['a']\nrestart = true", "unknown key workers.restart"),
    ],
)
def test_a_bad_workers_table_names_what_to_fix(tmp_path: Path, table: str, problem: str) -> None:
    data = tomllib.loads(f"[repository]\npath = '.'\n[workers]\n{table}\n")
    with pytest.raises(config_file.ConfigError) as raised:
        config_file.from_mapping(data, source="t.toml", base_dir=tmp_path)
    assert any(problem in p for p in raised.value.problems), raised.value.problems


def test_workers_command_as_a_string_runs_through_the_shell(tmp_path: Path) -> None:
    data = tomllib.loads(
        "[repository]\npath = '.'\n[workers]\ncount = 3\ncommand = 'agent --auto \"x y\"'\n"
    )
    pool = config_file.from_mapping(data, source="t.toml", base_dir=tmp_path).workers
    assert pool is not None
    assert pool.command == ("/bin/sh", "-c", 'agent --auto "x y"') and pool.count == 3


def test_reload_keeps_restart_only_settings_and_names_them(tmp_path: Path) -> None:
    def load(extra: str) -> config_file.Config:
        text = f"[repository]\npath = '.'\n[daemon]\nsocket = 's.sock'\n{extra}"
        data = tomllib.loads(text)
        return config_file.from_mapping(data, source="t", base_dir=tmp_path)

    old = load("[leases]\nttl_s = 60\n")
    new, ignored = config_file.reloaded(old, load("socket_mode = '0600'\n[leases]\nttl_s = 5\n"))
    assert ignored == ["socket_mode"]
    assert new.socket_mode == old.socket_mode and new.lease_ttl_s == 5


def test_gates_die_with_a_killed_daemon_and_never_see_its_notify_socket(
    tmp_path: Path, repo: Path
) -> None:
    systemd = NotifyListener(tmp_path)
    seen = tmp_path / "gate-env"
    gate_code = (
        "import os, pathlib, time\n"
        f"pathlib.Path({str(seen)!r}).write_text("
        "f\"{os.getpid()} {os.environ.get('NOTIFY_SOCKET', '')}\")\n"
        "time.sleep(3600)\n"
    )
    gates = (f'[[gates]]\nname = "slow"\nrun = [{json.dumps(sys.executable)}, "-c", '
             f"{json.dumps(gate_code)}]\n")
    daemon = Daemon(write_config(tmp_path, repo, gates=gates), tmp_path / "daemon.log",
                    env={"NOTIFY_SOCKET": systemd.env_value}).start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("gated")]})
        text = wait_for(lambda: seen.exists() and seen.read_text(), "the gate to start")
        _, _, notify = text.partition(" ")
        assert notify == "", "agent code must not be able to speak for the service"
        daemon.kill()
        # By its argv: the pid it wrote is one of its PID namespace, not ours.
        wait_for(lambda: not host_pids(str(seen)), "the gate to die with its daemon")
    finally:
        kill_group(worker)
        systemd.close()


def test_a_pool_worker_whose_wrapper_died_is_not_left_running(
    tmp_path: Path, repo: Path
) -> None:
    log = tmp_path / "daemon.log"
    daemon = Daemon(_pool_config(tmp_path, repo, count=1, name="worker"), log).start()
    try:
        wait_for(lambda: control(daemon.socket, "status")["workers"], "the pool's worker")
        wrapper = int(_events(log, "pool_worker_started")[0]["pid"])
        children = Path(f"/proc/{wrapper}/task/{wrapper}/children").read_text().split()
        assert len(children) == 1
        worker = int(children[0])
        os.kill(wrapper, signal.SIGKILL)  # the wrapper alone, as the OOM killer might
        wait_for(lambda: len(_events(log, "pool_worker_started")) == 2, "the restart")
        wait_for(lambda: not _alive(worker), "the orphaned worker to be killed")
        wait_for(lambda: len(control(daemon.socket, "status")["workers"]) == 1, "one worker")
    finally:
        assert daemon.stop() == 0


def test_a_reload_that_drops_a_uid_shuts_out_its_open_session(
    tmp_path: Path, repo: Path
) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    public = Path(tempfile.mkdtemp(prefix="orch-sock-"))
    public.chmod(0o755)
    try:
        config = write_config(
            tmp_path, repo,
            extra='socket_mode = "0666"\nallowed_uids = [65534]\ncontrol_uids = [65534]',
        )
        config.write_text(config.read_text().replace(
            f'socket = "{tmp_path}/state/d.sock"', f'socket = "{public}/d.sock"'))
        log = tmp_path / "daemon.log"
        daemon = Daemon(config, log).start()
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child becomes nobody, initializes, then waits for the reload
            try:
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(60)
                    s.connect(str(daemon.socket))
                    replies = s.makefile("rb")
                    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":'
                              b'{"protocolVersion":1,"role":"control"}}\n')
                    os.write(to_parent_w, replies.readline())
                    os.read(to_child_r, 1)
                    s.sendall(b'{"jsonrpc":"2.0","id":2,"method":"status"}\n')
                    os.write(to_parent_w, replies.readline())
            finally:
                os._exit(0)
        os.close(to_parent_w)
        replies = os.fdopen(to_parent_r, "rb")
        try:
            assert "result" in json.loads(replies.readline()), "nobody is allowed at first"
            config.write_text(
                config.read_text().replace("allowed_uids = [65534]", "").replace(
                    "control_uids = [65534]", ""))
            daemon.process.send_signal(signal.SIGHUP)
            wait_for(lambda: _events(log, "config_reloaded"), "the reload")
            os.write(to_child_w, b"g")
            assert json.loads(replies.readline())["error"]["code"] == -32002
        finally:
            # Closing our end unblocks a child still waiting for the go, whatever failed.
            os.close(to_child_w)
            replies.close()
            os.waitpid(pid, 0)
            daemon.stop()
    finally:
        shutil.rmtree(public, ignore_errors=True)


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate"
)
def test_started_by_systemds_own_socket_activation_on_the_first_connection(
    tmp_path: Path, repo: Path
) -> None:
    config = write_config(tmp_path, repo)
    path = Path(config.read_text().split('socket = "')[1].split('"')[0])
    path.parent.mkdir(parents=True)
    log = tmp_path / "daemon.log"
    # systemd's own tool: listens, and on the first connection runs the daemon with
    # LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES set exactly as PID 1 would.
    activator = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(path), sys.executable, "-m", "orchestrator",
         "--config", str(config), "serve"],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        wait_for(path.exists, "the activator to listen")
        assert "counts" in control(path, "status")  # this connection starts the daemon
        assert [e.get("activated") for e in _events(log, "socket_listening")] == [True]
    finally:
        activator.send_signal(signal.SIGTERM)  # the daemon itself: the tool exec'd it
        assert activator.wait(timeout=60) == 0
