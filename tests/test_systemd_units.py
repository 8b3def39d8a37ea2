"""The unit files in systemd/: systemd accepts them, they stay hardened, and they agree with
the daemon's defaults; `make install-service` lays them out.

Nothing here needs systemd running as PID 1: `systemd-analyze verify` and `security
--offline=yes` only read unit files. Tests needing a tool that is absent are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import config as config_module

ROOT = Path(__file__).resolve().parent.parent
UNITS_DIR = ROOT / "systemd"
UNITS = ["orchestrator.service", "orchestrator.socket", "orchestrator-worker@.service"]
# What the units run; tests point it at an executable that exists here.
INSTALLED_BINARY = "/opt/orchestrator/bin/orchestrator"
# The bar for `systemd-analyze security --offline=yes` (0 = locked down, 10 = exposed).
MAX_EXPOSURE = 2.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not found")


def _stand_in_binary() -> str:
    """The venv's ``orchestrator`` when installed, else this interpreter: `verify` only
    checks that ExecStart= names an executable file."""
    candidate = Path(sys.executable).parent / "orchestrator"
    return str(candidate) if os.access(candidate, os.X_OK) else sys.executable


def _copy_units(dest: Path) -> Path:
    """Copy every unit next to each other (the socket finds its service there), with
    ExecStart= pointing at an executable that exists on this machine."""
    for unit in UNITS:
        text = (UNITS_DIR / unit).read_text(encoding="utf-8")
        (dest / unit).write_text(
            text.replace(INSTALLED_BINARY, _stand_in_binary()), encoding="utf-8"
        )
    return dest


def _verify(unit: Path) -> list[str]:
    """Run `systemd-analyze verify` on one unit; return its complaints about our units.

    verify exits 0 after mere warnings (an unknown or misspelt key is "ignoring"), so the
    output counts too. Only lines naming a file in the unit's folder or one of our units
    count: the host's own units (multi-user.target, ...) are not ours to judge, and
    --recursive-errors=no keeps their errors out of the exit status.
    """
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", "--recursive-errors=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    ours = (str(unit.parent), "orchestrator.service", "orchestrator.socket", "orchestrator-worker@")
    output = (result.stdout + result.stderr).splitlines()
    problems = [line for line in output if any(name in line for name in ours)]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}: {result.stderr.strip()}")
    return problems


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_passes(unit: str, tmp_path: Path) -> None:
    copied = _copy_units(tmp_path)
    assert _verify(copied / unit) == []


@needs_analyze
def test_verify_check_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above must be able to fail: a misspelt value is only a warning to verify."""
    copied = _copy_units(tmp_path)
    service = copied / "orchestrator.service"
    text = service.read_text(encoding="utf-8")
    service.write_text(text.replace("Restart=on-failure", "Restart=on-failures"), encoding="utf-8")
    assert any("restart" in line.lower() for line in _verify(service))


def _exposure(unit: Path) -> float:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd 250 or newer has)")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1))


@needs_analyze
@pytest.mark.parametrize("unit", ["orchestrator.service", "orchestrator-worker@.service"])
def test_security_exposure_is_at_most_2(unit: str, tmp_path: Path) -> None:
    copied = _copy_units(tmp_path)
    exposure = _exposure(copied / unit)
    assert exposure <= MAX_EXPOSURE, f"{unit}: exposure {exposure} > {MAX_EXPOSURE}"


def _settings(unit: str) -> dict[str, list[str]]:
    """``key -> values`` of a unit file, in order (a key may repeat, e.g. SystemCallFilter=)."""
    settings: dict[str, list[str]] = {}
    for raw in (UNITS_DIR / unit).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_socket_unit_listens_where_the_daemon_binds_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Socket activation and a daemon started alone must use the same path and mode, or
    workers configured for one would not find the other."""
    service, socket = _settings("orchestrator.service"), _settings("orchestrator.socket")
    # What systemd sets from RuntimeDirectory=/StateDirectory=, with a config that leaves
    # daemon.socket and daemon.socket_mode to their defaults.
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/" + service["RuntimeDirectory"][0])
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/" + service["StateDirectory"][0])
    minimal = tmp_path / "orchestrator.toml"
    minimal.write_text('[repository]\npath = "/srv/project"\n', encoding="utf-8")
    defaults = config_module.load(minimal)
    assert socket["ListenStream"] == [str(defaults.socket)]
    assert int(socket["SocketMode"][0], 8) == defaults.socket_mode
    # The shipped config spells the same path out (workers read it from there).
    shipped = config_module.load(ROOT / "config" / "orchestrator.toml")
    assert socket["ListenStream"] == [str(shipped.socket)]
    assert socket["SocketUser"] == service["User"]
    assert socket["SocketGroup"] == service["Group"]


def test_socket_file_survives_a_stop_of_the_service() -> None:
    """The socket lives in RuntimeDirectory=; systemd deletes that directory when the service
    stops unless it is preserved, which would unlink the file systemd still listens on."""
    service, socket = _settings("orchestrator.service"), _settings("orchestrator.socket")
    runtime = "/run/" + service["RuntimeDirectory"][0] + "/"
    assert socket["ListenStream"][0].startswith(runtime)
    assert service["RuntimeDirectoryPreserve"] == ["yes"]
    # Nor may stopping the socket unit unlink the path a running daemon still serves on.
    assert socket.get("RemoveOnStop", ["no"]) == ["no"]


def test_service_works_without_the_socket_unit() -> None:
    service = _settings("orchestrator.service")
    for key in ("Requires", "BindsTo", "Requisite", "Sockets"):
        assert not any("orchestrator.socket" in v for v in service.get(key, [])), key


def test_stop_and_restart_fit_a_graceful_drain() -> None:
    for unit in ("orchestrator.service", "orchestrator-worker@.service"):
        settings = _settings(unit)
        # SIGTERM to the main process only: it stops its gates or agent itself.
        assert settings["KillMode"] == ["mixed"], unit
        assert "TimeoutStopSec" in settings, unit
        # Workers outlive a daemon restart: nothing may tie them to the daemon's lifetime.
        if unit.startswith("orchestrator-worker@"):
            for key in ("BindsTo", "PartOf", "Requires"):
                assert key not in settings, (unit, key)
    service = _settings("orchestrator.service")
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert "WatchdogSec" in service
    assert service["Restart"] == ["on-failure"]
    # `systemctl reload` is the daemon's SIGHUP config reload.
    # Through the shell's builtin kill: a minimal Debian has no /bin/kill (status 203/EXEC).
    assert service["ExecReload"] == ["/bin/sh -c 'kill -HUP ${MAINPID}'"]


def test_worker_template_runs_agents_as_a_user_of_their_own() -> None:
    """Agents run as orchestrator-agent (issue 12 item 2): not the daemon's user, with a
    home of its own, writing only the lease directories, never the state directory (the
    store) nor the repository; it finds the socket without the daemon's config (0640)."""
    service, worker = _settings("orchestrator.service"), _settings("orchestrator-worker@.service")
    assert worker["User"] == ["orchestrator-agent"] != service["User"]
    assert worker["Group"] == ["orchestrator-agent"] != service["Group"]
    sysusers = (UNITS_DIR / "orchestrator.sysusers").read_text(encoding="utf-8")
    assert re.search(r"(?m)^u\s+orchestrator-agent\s.*\s/var/lib/orchestrator-agent\s", sysusers)
    assert worker["StateDirectory"] == ["orchestrator-agent"]
    assert "--config" not in worker["ExecStart"][0]
    listen = _settings("orchestrator.socket")["ListenStream"][0]
    assert worker["Environment"] == [f"ORCHESTRATOR_SOCKET={listen}"]
    assert worker["EnvironmentFile"] == ["/etc/orchestrator/workers/%i.env"]
    state = "/var/lib/" + service["StateDirectory"][0]
    writable = set(" ".join(worker["ReadWritePaths"]).split())
    assert writable == {f"-{state}/worktrees"}
    assert worker["ProtectSystem"] == ["strict"]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not found")
def test_sysusers_entry_is_valid(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        [
            "systemd-sysusers",
            f"--root={tmp_path}",
            "--dry-run",
            str(UNITS_DIR / "orchestrator.sysusers"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Creating user 'orchestrator'" in result.stdout + result.stderr
    # Home = state directory, the one place the units let the user write.
    assert "/var/lib/orchestrator" in (UNITS_DIR / "orchestrator.sysusers").read_text()


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make not found")


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@needs_make
def test_install_service_lays_out_files_under_destdir(tmp_path: Path) -> None:
    destdir = tmp_path / "root"
    result = _make("install-service-files", f"DESTDIR={destdir}", "SERVICE_PREFIX=/opt/orch-test")
    assert result.returncode == 0, result.stdout + result.stderr
    units = destdir / "etc" / "systemd" / "system"
    assert sorted(p.name for p in units.iterdir()) == sorted(UNITS)
    for unit in UNITS:
        text = (units / unit).read_text(encoding="utf-8")
        assert INSTALLED_BINARY not in text
        if unit.endswith(".service"):
            assert "ExecStart=/opt/orch-test/bin/orchestrator " in text
    assert (destdir / "etc" / "sysusers.d" / "orchestrator.conf").is_file()
    assert (destdir / "etc" / "orchestrator" / "workers" / "worker.env.example").is_file()
    config = destdir / "etc" / "orchestrator" / "orchestrator.toml"
    # Readable by the service's group only: gates' environments may hold secrets.
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    # A staged install touches nothing on the running system.
    assert "systemctl enable" not in result.stdout

    # An existing config is the administrator's: a second install leaves it alone.
    config.write_text("# edited\n", encoding="utf-8")
    again = _make("install-service-files", f"DESTDIR={destdir}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert config.read_text(encoding="utf-8") == "# edited\n"


@needs_make
def test_install_service_puts_the_package_under_destdir_too(tmp_path: Path) -> None:
    """Dry run (-n): building a venv and installing the package takes minutes and the
    network, but where it would go is what matters here."""
    destdir = tmp_path / "root"
    result = _make("-n", "install-service", f"DESTDIR={destdir}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"-m venv {destdir}/opt/orchestrator" in result.stdout
    assert f"{destdir}/opt/orchestrator/bin/python -m pip install" in result.stdout
    # The CLI link points at the final path, not into the staging directory.
    assert f"ln -sfn /opt/orchestrator/bin/orchestrator {destdir}/usr/local/bin/" in result.stdout
    assert not destdir.exists()
