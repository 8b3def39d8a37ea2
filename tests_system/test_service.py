"""The service under a real systemd, checked as a person would, with systemctl and journalctl.

The tests run in file order on one booted machine (conftest.py's `box`); the `service`
fixture installs it by README's "Run as a service" commands, and each test leaves the
service running for the next one.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import CHECKOUT_IN_BOX, ROOT, Box, handoff_doc

# Boot, image build (debootstrap on a fresh machine) and install are set up within the
# first test's limit; the watchdog test waits 30 s for systemd.
# Every test runs on the machine as README's steps left it.
pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("service")]

# The one thing README says that cannot be run here as written: the example remote. The
# test stands up a local one and clones that instead.
README_REMOTE = "https://example.com/project.git"
LOCAL_REMOTE = "file:///var/tmp/project.git"
# What the agent of orchestrator-worker@claude-1 does: write who it runs as into the
# worktree (the worker commits it), and for a handoff named hold-*, wait for a file the
# test creates, so that a daemon restart happens while the agent is at work.
AGENT_COMMAND = (
    "id -un > user-$ORCHESTRATOR_HANDOFF.txt; case $ORCHESTRATOR_HANDOFF in hold-*) "
    "until [ -e /run/orchestrator-test/release ]; do sleep 0.2; done;; esac"
)
# Gates the test configures: a clean one that passes at once.
GATES = '[[gates]]\nname = "ok"\nrun = ["true"]\n'

# $EDITOR for README's sudoedit lines: makes the edits README asks the reader to make.
EDITOR = f"""#!/usr/bin/python3
import re, sys
path = sys.argv[1]
text = open(path).read()
if "[repository]" in text:
    # repository.path is already /srv/project; gates: one that passes; metrics on a free
    # port (the box shares this machine's network).
    text = re.sub(r"(?ms)^\\[\\[gates\\]\\].*?(?=^\\[metrics\\])", {GATES!r} + "\\n", text)
    text = text.replace('listen = "127.0.0.1:9464"', 'listen = "127.0.0.1:0"')
elif "AGENT_COMMAND" in text:
    line = 'AGENT_COMMAND="' + {AGENT_COMMAND!r} + '"'
    text = re.sub(r"(?m)^AGENT_COMMAND=.*$", lambda m: line, text)
else:
    sys.exit("the test's editor does not know " + path)
open(path, "w").write(text)
"""


def readme_service_commands() -> list[str]:
    """The shell commands of README's "Run as a service" section, in order, comments off."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Run as a service\n")
    end = readme.find("\n## ", start + 1)
    section = readme[start : end if end > 0 else None]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


@dataclass
class Ran:
    command: str
    rc: int
    output: str


@pytest.fixture(scope="session")
def service(box: Box) -> Iterator[dict[str, Ran]]:
    """The machine set up by README's "Run as a service" commands, run as written from the
    checkout; what each printed."""
    box.sh(
        "set -e; git init -q -b main /var/tmp/seed && cd /var/tmp/seed"
        " && echo '# project' > README.md && git add README.md"
        " && git -c user.name=upstream -c user.email=up@example.com commit -qm init"
        " && git clone -q --bare /var/tmp/seed /var/tmp/project.git"
        " && chmod -R a+rX /var/tmp/project.git"
        " && git config --system --add safe.directory /var/tmp/project.git"
    )
    box.write("/root/readme-editor", EDITOR, 0o755)
    box.sh("install -d -m 0755 /run/orchestrator-test")
    ran: dict[str, Ran] = {}
    for command in readme_service_commands():
        runnable = command.replace(README_REMOTE, LOCAL_REMOTE)
        if re.search(r"\s-f(\s|$)", runnable):  # a follow: read what is there for 3 s
            runnable = f"timeout 3 {runnable}"
        started = time.monotonic()
        rc, out = box.rc(
            f"cd {CHECKOUT_IN_BOX} && export EDITOR=/root/readme-editor && {runnable}",
            timeout=300,
        )
        ran[command] = Ran(command, rc, out)
        print(f"{time.monotonic() - started:5.1f} s  {command}", file=sys.stderr)
        follow_ended = runnable.startswith("timeout 3 ") and rc == 124
        if rc != 0 and not follow_ended:
            pytest.fail(f"README's `{command}` failed (exit {rc}) in the box:\n{out}")
    yield ran


def json_stream(text: str) -> list[dict[str, object]]:
    """The JSON values jq printed (pretty, one after the other)."""
    decoder, values, at = json.JSONDecoder(), [], text.find("{")
    while at >= 0:
        value, end = decoder.raw_decode(text, at)
        values.append(value)
        at = text.find("{", end)
    return values


def status_json(box: Box) -> dict[str, Any]:
    """`orchestrator status --json`, as root."""
    status: dict[str, Any] = json.loads(box.sh("orchestrator status --json"))
    return status


def handoff_state(box: Box, name: str) -> str:
    return str(json.loads(box.sh(f"orchestrator show --json {name}"))["state"])


def submit(box: Box, name: str) -> None:
    box.write(f"/root/handoffs/{name}.md", handoff_doc(name))
    box.sh(f"sudo orchestrator submit /root/handoffs/{name}.md")


def wait_merged(box: Box, name: str, timeout: float = 60) -> None:
    box.wait_for(f"{name} to be merged", lambda: handoff_state(box, name) == "merged", timeout)


def journal_since(box: Box, cursor: str, *args: str) -> str:
    quoted = " ".join(shlex.quote(a) for a in args)
    return box.sh(f"journalctl --no-pager --after-cursor={shlex.quote(cursor)} {quoted}")


def logged(box: Box, since: str, needle: str, *args: str, timeout: float = 20) -> str:
    """The journal after `since` (journalctl ARGS) once it holds needle: journald writes
    a service's stdout lines a little after the fact."""
    found: list[str] = []

    def holds() -> bool:
        found[:] = [journal_since(box, since, *args)]
        return needle in found[0]

    box.wait_for(f"{needle!r} in the journal ({' '.join(args)})", holds, timeout, 0.5)
    return found[0]


def cursor(box: Box) -> str:
    out = box.sh("journalctl -n 0 --show-cursor --no-pager")
    return out.strip().rsplit("-- cursor: ", 1)[1].strip()


# --- README's steps ----------------------------------------------------------------------


def test_readme_run_as_a_service(box: Box, service: dict[str, Ran]) -> None:
    """README's commands, run word for word, install a service that is up and serving."""
    commands = list(service)
    assert commands[:2] == ["sudo apt-get install -y bubblewrap", "sudo make install-service"]
    assert "sudo systemctl enable --now orchestrator.socket orchestrator.service" in commands
    check = service["sudo -u orchestrator orchestrator check-config"].output
    assert "configuration is valid" in check
    status = service["systemctl status orchestrator"].output
    assert "Active: active (running)" in status
    assert re.search(r'Status: "\d+ workers?, ', status), status  # the daemon's STATUS=
    assert "TriggeredBy: ● orchestrator.socket" in status
    assert "integration: main at" in service["sudo orchestrator status"].output
    jq = next(r for c, r in service.items() if "| jq" in c)
    ready = json_stream(jq.output)
    assert ready and all(r["event"] == "daemon_ready" for r in ready), jq.output
    assert box.prop("orchestrator-worker@claude-1", "ActiveState") == "active"
    # make install-service admitted the agent user in the config it installed
    agent_uid = box.sh("id -u orchestrator-agent").strip()
    config = box.path("/etc/orchestrator/orchestrator.toml").read_text()
    assert f"allowed_uids = [{agent_uid}]" in config
    assert f"allowed_uids = [{agent_uid}]" in service["sudo make install-service"].output


def test_a_handoff_lands_through_a_worker_unit_running_as_the_agent_user(box: Box) -> None:
    """orchestrator-worker@claude-1 leases, its agent runs as the unit's User=, the
    handoff is gated and merged; the agent's user is not root."""
    submit(box, "first")
    wait_merged(box, "first")
    unit = "orchestrator-worker@claude-1"
    agent_user = box.prop(unit, "User")
    assert agent_user and agent_user != "root"
    worker_pid = box.prop(unit, "MainPID")
    assert box.sh(f"ps -o user= -p {worker_pid}").strip() == agent_user
    landed = box.sh("sudo -u orchestrator git -C /srv/project show main:user-first.txt")
    assert landed.strip() == agent_user
    gates = json.loads(box.sh("orchestrator show --json first"))["gates"]
    assert [g["gate"] for g in gates] == ["ok"]


def test_root_is_control_and_a_stranger_is_turned_away(box: Box) -> None:
    """`sudo orchestrator status` works as root (root is always control); a user the
    socket does not admit gets a clear refusal, not a traceback."""
    out = box.sh("sudo orchestrator status")
    assert "integration: main at" in out
    box.sh("id visitor >/dev/null 2>&1 || useradd --create-home visitor")
    for how in ("", "--socket /run/orchestrator/orchestrator.sock "):
        rc, out = box.rc(f"cd /tmp && sudo -u visitor orchestrator {how}status")
        assert rc != 0 and "Traceback" not in out, out
        assert len(out.strip().splitlines()) <= 2, out
        assert "ermission denied" in out or "not authorized" in out, out


def test_journald_carries_the_daemons_json_logs(box: Box) -> None:
    """Every line the daemon wrote to the journal is one JSON object with an event."""
    lines = box.sh("journalctl -u orchestrator -t orchestrator -o cat --no-pager").splitlines()
    assert lines
    for line in lines:
        record = json.loads(line)
        assert record["event"] and record["level"], line


# --- Type=notify and socket activation ---------------------------------------------------


def test_start_returns_only_once_ready_and_the_socket_activates_the_daemon(box: Box) -> None:
    """Without the socket unit the daemon binds the socket itself: a client connecting the
    moment `systemctl start` returns is served (Type=notify waited for READY=1). With the
    socket unit back, the daemon is stopped until the first connection starts it. (The
    worker unit is stopped meanwhile: its reconnecting would be that first connection.)"""
    box.sh("systemctl stop orchestrator-worker@claude-1 orchestrator.socket orchestrator.service")
    assert box.prop("orchestrator.service", "ActiveState") == "inactive"
    out = box.sh("systemctl start orchestrator.service && orchestrator status")
    assert "integration: main at" in out
    assert box.prop("orchestrator.service", "StatusText")
    assert box.prop("orchestrator.service", "Type") == "notify"

    box.sh("systemctl stop orchestrator.service && systemctl start orchestrator.socket")
    assert box.prop("orchestrator.service", "ActiveState") == "inactive"
    assert box.prop("orchestrator.socket", "ActiveState") == "active"
    since = cursor(box)
    out = box.sh("orchestrator status")  # the first connection
    assert "integration: main at" in out
    assert box.prop("orchestrator.service", "ActiveState") == "active"
    log = logged(box, since, '"socket_listening"', "-u", "orchestrator", "-o", "cat")
    listening = [json.loads(x) for x in log.splitlines() if '"socket_listening"' in x]
    assert listening and listening[-1]["activated"] is True, log
    box.sh("systemctl start orchestrator-worker@claude-1")


PROBE = r"""
import json, os, socket, sys, time
path, stop = sys.argv[1], sys.argv[2]  # connect until the file `stop` exists (60 s at most)
ok, errors, deadline = 0, [], time.monotonic() + 60
init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": 1, "role": "control", "client": {"name": "probe", "version": "1"}}}
while time.monotonic() < deadline and not os.path.exists(stop):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    try:
        s.connect(path)
        s.sendall((json.dumps(init) + "\n").encode())
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed before a reply")
            reply += chunk
        assert "result" in json.loads(reply), reply
        ok += 1
    except Exception as e:
        errors.append(repr(e))
    finally:
        s.close()
    time.sleep(0.02)
print(json.dumps({"ok": ok, "errors": errors}))
"""


def test_the_socket_outlives_a_daemon_restart_and_so_do_workers(box: Box) -> None:
    """While the daemon restarts, a client keeps connecting and every time is served (it
    waits in the socket's backlog); the worker unit is not restarted, its agent keeps
    working on its lease, and the handoff lands afterwards."""
    unit = "orchestrator-worker@claude-1"
    worker_pid = box.wait_active(unit)
    submit(box, "hold-restart")
    box.wait_for("the agent to be at work", lambda: handoff_state(box, "hold-restart") == "leased")
    daemon_pid = box.prop("orchestrator.service", "MainPID")
    box.write("/root/probe.py", PROBE)
    probe = box.popen("/opt/orchestrator/bin/python /root/probe.py "
                      "/run/orchestrator/orchestrator.sock /root/probe-stop")
    try:
        # The probe connects all through the restart: from before it to a second after the
        # new daemon is ready (Type=notify: that is when systemctl returns).
        box.sh("sleep 1 && systemctl restart orchestrator.service && sleep 1"
               " && touch /root/probe-stop")
        out, _ = probe.communicate(timeout=120)
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["errors"] == [] and result["ok"] > 0, result
    assert box.prop("orchestrator.service", "MainPID") != daemon_pid
    assert box.prop(unit, "MainPID") == worker_pid
    box.sh("touch /run/orchestrator-test/release")
    try:
        wait_merged(box, "hold-restart")
    finally:
        box.sh("rm -f /run/orchestrator-test/release")
    assert box.prop(unit, "MainPID") == worker_pid
    names = [w["name"] for w in status_json(box)["workers"]]
    assert "claude-1" in names


# --- reload ------------------------------------------------------------------------------


def test_reload_applies_a_changed_gate_and_refuses_a_broken_config(box: Box) -> None:
    """`systemctl reload` with a new gate: the daemon (same pid) gates the next handoff
    with it. With a broken file: refused, logged, the daemon keeps running on the old
    config."""
    config = "/etc/orchestrator/orchestrator.toml"
    original = box.path(config).read_text()
    pid = box.prop("orchestrator.service", "MainPID")
    # As on a minimal Debian without procps: the reload must not need /bin/kill.
    box.sh("mv /usr/bin/kill /usr/bin/kill.hidden")
    try:
        box.path(config).write_text(original.replace('name = "ok"', 'name = "reloaded"'))
        since = cursor(box)
        box.sh("systemctl reload orchestrator")
        assert box.prop("orchestrator.service", "MainPID") == pid
        assert box.prop("orchestrator.service", "ActiveState") == "active"
        logged(box, since, '"config_reloaded"', "-u", "orchestrator", "-o", "cat")
        submit(box, "after-reload")
        wait_merged(box, "after-reload")
        gates = json.loads(box.sh("orchestrator show --json after-reload"))["gates"]
        assert [g["gate"] for g in gates] == ["reloaded"]

        box.path(config).write_text(original + "\nthis is [not toml\n")
        since = cursor(box)
        box.sh("systemctl reload orchestrator")
        logged(box, since, '"reload_refused"', "-u", "orchestrator", "-o", "cat")
        assert box.prop("orchestrator.service", "MainPID") == pid
        assert box.prop("orchestrator.service", "ActiveState") == "active"
        # The CLI reads the (now broken) config to find the socket: tell it instead.
        sock = "--socket /run/orchestrator/orchestrator.sock"
        box.write("/root/handoffs/after-refusal.md", handoff_doc("after-refusal"))
        box.sh(f"orchestrator {sock} submit /root/handoffs/after-refusal.md")
        box.wait_for("after-refusal to be merged", lambda: json.loads(
            box.sh(f"orchestrator {sock} show --json after-refusal"))["state"] == "merged")
        gates = json.loads(box.sh(f"orchestrator {sock} show --json after-refusal"))["gates"]
        assert [g["gate"] for g in gates] == ["reloaded"]
    finally:
        box.sh("mv /usr/bin/kill.hidden /usr/bin/kill")
        box.path(config).write_text(original)
        box.sh("systemctl reload orchestrator")


# --- hardening as applied --------------------------------------------------------------


def test_a_gate_cannot_reach_the_store(box: Box) -> None:
    """A gate runs code an agent wrote: it must not read or write the daemon's store. Today
    gates run as the daemon's user inside its sandbox (unless merge.gate_sandbox confines
    them), so this is expected to fail until gates are sandboxed by default (issue 12)."""
    config = "/etc/orchestrator/orchestrator.toml"
    original = box.path(config).read_text()
    probe = (
        '[[gates]]\nname = "store-probe"\nrun = ["sh", "-c", "! head -c1 '
        '/var/lib/orchestrator/orchestrator.sqlite3 >/dev/null 2>&1 && ! touch '
        '/var/lib/orchestrator/orchestrator.sqlite3"]\n'
    )
    try:
        box.path(config).write_text(original.replace(GATES, probe))
        box.sh("systemctl reload orchestrator")
        submit(box, "store-probe")

        def gated() -> bool:
            return bool(json.loads(box.sh("orchestrator show --json store-probe"))["gates"])

        box.wait_for("the store probe's first gate run", gated)
        run = json.loads(box.sh("orchestrator show --json store-probe"))["gates"][0]
    finally:
        box.rc("orchestrator cancel store-probe")
        box.path(config).write_text(original)
        box.sh("systemctl reload orchestrator")
    if run["exitStatus"] != 0:
        pytest.xfail("a gate can read the store: gates are not sandboxed by default yet")


def test_the_daemon_cannot_write_outside_its_directories(box: Box) -> None:
    """In the daemon's own mount namespace, as its user: the state directory and the
    repository are writable; a directory the user owns elsewhere, /etc, the venv and the
    units are read-only, and /root and /home are not there at all."""
    pid = box.prop("orchestrator.service", "MainPID")
    box.sh("install -d -o orchestrator -g orchestrator /srv/elsewhere /var/local/owned")
    as_daemon = f"nsenter -t {pid} -m -S $(id -u orchestrator) -G $(id -g orchestrator)"
    for writable in ("/var/lib/orchestrator/probe", "/srv/project/.git/probe"):
        box.sh(f"{as_daemon} touch {writable} && rm -f {writable}")
    for sealed in ("/srv/elsewhere/probe", "/var/local/owned/probe"):
        rc, out = box.rc(f"{as_daemon} touch {sealed}")
        assert rc != 0 and "Read-only file system" in out, (sealed, out)
    for sealed in ("/etc/probe", "/opt/orchestrator/bin/probe", "/etc/systemd/system/x"):
        rc, out = box.rc(f"nsenter -t {pid} -m touch {sealed}")  # even as root
        assert rc != 0 and "Read-only file system" in out, (sealed, out)
    rc, out = box.rc(f"nsenter -t {pid} -m ls /root/orchestrator")
    assert rc != 0, out
    unit = "orchestrator-worker@claude-1"
    agent_user = box.prop(unit, "User")
    # Agents run as a user of their own: as the daemon's they could write both directly.
    assert agent_user != box.prop("orchestrator.service", "User")
    wpid = box.prop(unit, "MainPID")
    as_agent = f"nsenter -t {wpid} -m -S $(id -u {agent_user}) -G $(id -g {agent_user})"
    for store in ("orchestrator.sqlite3", "orchestrator.sqlite3-wal"):
        rc, out = box.rc(f"{as_agent} cat /var/lib/orchestrator/{store}")
        assert rc != 0 and "ermission denied" in out, "the agent read the store"
    rc, out = box.rc(f"{as_agent} ls /var/lib/orchestrator")
    assert rc != 0, "the agent listed the state directory"
    rc, out = box.rc(f"{as_agent} touch /srv/project/.git/refs/heads/probe")
    assert rc != 0, "the agent wrote in the integration repository"
    # and outside the worker's sandbox too, by the files' permissions alone
    as_agent_anywhere = f"cd /tmp && sudo -u {agent_user}"
    rc, out = box.rc(f"{as_agent_anywhere} cat /var/lib/orchestrator/orchestrator.sqlite3")
    assert rc != 0 and "ermission denied" in out, "the agent read the store"
    for probe in ("/srv/project/.git/refs/heads/probe", "/srv/project/.git/objects/probe",
                  "/var/lib/orchestrator/probe", "/var/lib/orchestrator/worktrees/probe"):
        rc, out = box.rc(f"{as_agent_anywhere} touch {probe}")
        assert rc != 0 and "ermission denied" in out, (probe, out)
    # what it needs of the repository it can read: every object the daemon merged
    rc, out = box.rc(f"{as_agent_anywhere} git --git-dir=/srv/project/.git "
                     "-c safe.directory='*' fsck --connectivity-only --no-dangling")
    assert rc == 0, out


# --- crashes: Restart= and the watchdog -------------------------------------------------


def test_a_killed_daemon_is_restarted(box: Box) -> None:
    """SIGKILL to the main process: systemd restarts it (Restart=on-failure) 5 s later."""
    pid = box.prop("orchestrator.service", "MainPID")
    restarts = int(box.prop("orchestrator.service", "NRestarts"))
    since = cursor(box)
    box.sh("systemctl kill --kill-who=main -s KILL orchestrator.service")
    box.wait_for("a new daemon",
                 lambda: box.prop("orchestrator.service", "MainPID") not in ("0", pid), 60)
    box.wait_active("orchestrator.service")
    assert int(box.prop("orchestrator.service", "NRestarts")) == restarts + 1
    logged(box, since, "status=9/KILL", "-u", "orchestrator", "-o", "cat")
    assert "integration: main at" in box.sh("orchestrator status")


def test_the_watchdog_restarts_a_stopped_daemon(box: Box) -> None:
    """A daemon frozen with SIGSTOP stops pinging WATCHDOG=1: after WatchdogSec (30 s)
    systemd kills it and starts a new one."""
    pid = box.prop("orchestrator.service", "MainPID")
    since = cursor(box)
    box.sh(f"kill -STOP {pid}")
    box.wait_for("the watchdog to replace the daemon",
                 lambda: box.prop("orchestrator.service", "MainPID") not in ("0", pid), 90, 1)
    box.wait_active("orchestrator.service")
    logged(box, since, "Watchdog timeout", "-u", "orchestrator", "-o", "cat")
    assert "integration: main at" in box.sh("orchestrator status")


# --- the worker unit stops cleanly ------------------------------------------------------


def test_a_worker_unit_stops_cleanly(box: Box) -> None:
    """`systemctl stop orchestrator-worker@claude-1`: the worker leaves on SIGTERM (no
    SIGKILL after the timeout), the unit ends inactive with success, the daemon forgets it."""
    unit = "orchestrator-worker@claude-1"
    box.wait_active(unit)
    box.wait_for("the worker to be attached",
                 lambda: "claude-1" in [w["name"] for w in status_json(box)["workers"]])
    since = cursor(box)
    box.sh(f"systemctl stop {unit}")
    assert box.prop(unit, "ActiveState") == "inactive"
    assert box.prop(unit, "Result") == "success"
    log = logged(box, since, "Stopped", "-u", unit, "-o", "cat")
    assert "SIGKILL" not in log and "timed out" not in log, log
    box.wait_for("the daemon to drop the worker",
                 lambda: "claude-1" not in [w["name"] for w in status_json(box)["workers"]])


def test_a_daemon_that_cannot_start_stops_being_restarted(box: Box) -> None:
    """A config that stops the daemon at start-up: restarted 5 s apart, and after 5 failed
    starts (StartLimitBurst=) the unit stays failed, its socket too; README's
    `systemctl reset-failed ...` and `systemctl start ...` bring both back once the file
    is fixed."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    reset = "systemctl reset-failed orchestrator.socket orchestrator"
    start = "systemctl start orchestrator.socket orchestrator"
    assert f"`{reset}` and `{start}`" in readme
    config = "/etc/orchestrator/orchestrator.toml"
    original = box.path(config).read_text()
    box.sh(reset)  # earlier tests' starts count towards the limit too
    since = cursor(box)
    try:
        box.path(config).write_text(original + "\nthis is [not toml\n")
        box.rc("systemctl restart orchestrator.service")
        logged(box, since, "Start request repeated too quickly", "-u", "orchestrator", "-o",
               "cat", timeout=180)
        log = journal_since(box, since, "-u", "orchestrator", "-o", "cat")
        assert log.count("status=2/INVALIDARGUMENT") == 5, log
        assert box.prop("orchestrator.service", "ActiveState") == "failed"
        assert box.prop("orchestrator.socket", "ActiveState") == "failed"
    finally:
        box.path(config).write_text(original)
    box.sh(reset)
    box.sh(start)
    box.wait_active("orchestrator.service")
    assert box.prop("orchestrator.socket", "ActiveState") == "active"
    assert "integration: main at" in box.sh("orchestrator status")
