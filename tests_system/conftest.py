"""The system test layer: the service under a real systemd 252 as PID 1 (`make test-system`).

A Debian 12 machine is booted in a container by `systemd-box` (shared/tools/systemd-box,
found beside the repository as `../shared/tools/systemd-box`) once per run; the package is
installed in it from this checkout with `make install-service`, then README's "Run as a
service" commands are run as written (test_service.py::test_readme_run_as_a_service).

The debootstrapped image is built once and kept in $ORCHESTRATOR_BOX_CACHE (default
/var/cache/orchestrator-system-tests); each run boots a throwaway copy of it, so a run
starts from a clean machine and leaves nothing behind but the cache.

Everything skips, saying why, where containers cannot run here (not root, no
systemd-nspawn/debootstrap, no namespaces, the tool not beside the repository).
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Bump when the provisioning below changes: an image built by an older recipe is rebuilt.
IMAGE_VERSION = "bookworm-2"
# What a person following README needs beyond the tool's minimal Debian: sudo (README's
# commands use it) and jq (README's log recipe).
IMAGE_PACKAGES = ["sudo", "jq", "bubblewrap"]
BOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where the box finds the checkout (the tool binds it read-only there) and where it is
# copied to so that `make install-service` can build in it.
CHECKOUT_IN_BOX = "/root/orchestrator"


def _tool_candidates() -> list[Path]:
    """Where systemd-box may be: $ORCHESTRATOR_SYSTEMD_BOX, else ../shared/tools beside
    this checkout, else beside the main checkout when this one is a `git worktree`. It is
    run with bash, so a copy of shared/ that lost its x bit still works."""
    found: list[Path] = []
    if os.environ.get("ORCHESTRATOR_SYSTEMD_BOX"):
        found.append(Path(os.environ["ORCHESTRATOR_SYSTEMD_BOX"]))
    found.append(ROOT.parent / "shared" / "tools" / "systemd-box")
    try:
        common = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--path-format=absolute", "--git-common-dir"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        common = ""
    if common:
        found.append(Path(common).parent.parent / "shared" / "tools" / "systemd-box")
    return found


def _why_no_box() -> tuple[Path | None, str]:
    """The tool, or why the system tests cannot run on this machine."""
    tool = next((p for p in _tool_candidates() if p.is_file()), None)
    if tool is None:
        places = ", ".join(str(p) for p in _tool_candidates())
        return None, (
            f"systemd-box not found (looked at {places}); set $ORCHESTRATOR_SYSTEMD_BOX"
        )
    if os.geteuid() != 0:
        return None, "systemd-box needs root (systemd-nspawn, nsenter)"
    missing = [c for c in ("systemd-nspawn", "debootstrap", "nsenter") if not shutil.which(c)]
    if missing:
        return None, (
            f"{', '.join(missing)} not installed: apt-get install systemd-container "
            "debootstrap (.ci/run does)"
        )
    probe = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return None, f"containers cannot run here (unshare: {probe.stderr.strip()})"
    return tool, ""


class Box:
    """A booted machine: run commands in it as root, read and write its files."""

    def __init__(self, tool: Path, directory: Path) -> None:
        self.tool = tool
        self.dir = directory

    def path(self, inside: str) -> Path:
        """The host path of a file inside the box (the box's root is a plain directory)."""
        return self.dir / inside.lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside the box, as root."""
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def popen(self, script: str, **kwargs: object) -> subprocess.Popen[str]:
        """Start a bash script inside the box, as root, with a clean login-like environment."""
        argv = [
            "bash", str(self.tool), "run", str(self.dir), "env", "-i", f"PATH={BOX_PATH}",
            "HOME=/root", "USER=root", "LOGNAME=root", "LANG=C.UTF-8", "TERM=dumb",
            "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "bash", "-c", script,
        ]  # fmt: skip
        process: subprocess.Popen[str] = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **kwargs,  # type: ignore[call-overload]
        )
        return process

    def sh(self, script: str, *, check: bool = True, timeout: float = 120) -> str:
        """Run a bash script inside the box; its stdout and stderr together. check: fail
        the test, showing the output, on a non-zero exit."""
        process = self.popen(script)
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
            pytest.fail(f"timed out after {timeout} s in the box: {script}\n{out}")
        if check and process.returncode != 0:
            pytest.fail(f"exit {process.returncode} in the box: {script}\n{out}")
        self.last_rc = process.returncode
        return out

    def rc(self, script: str, timeout: float = 120) -> tuple[int, str]:
        """Exit status and output of a bash script inside the box."""
        out = self.sh(script, check=False, timeout=timeout)
        return self.last_rc, out

    def prop(self, unit: str, name: str) -> str:
        """One property of a unit, as `systemctl show -p NAME --value` prints it."""
        return self.sh(f"systemctl show -p {name} --value {shlex.quote(unit)}").strip()

    def wait_for(
        self, what: str, check: Callable[[], bool], timeout: float = 60, every: float = 0.3
    ) -> None:
        """Poll until check() holds; fail saying what was awaited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(every)
        pytest.fail(f"gave up after {timeout} s waiting for {what}")

    def wait_active(self, unit: str, timeout: float = 60) -> str:
        """Wait until unit is active (running); its main pid."""
        self.wait_for(
            f"{unit} to be active",
            lambda: self.prop(unit, "ActiveState") == "active"
            and self.prop(unit, "SubState") == "running",
            timeout,
        )
        return self.prop(unit, "MainPID")


def _run_tool(tool: Path, *args: str, timeout: float) -> str:
    done = subprocess.run(
        ["bash", str(tool), *args], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        pytest.fail(f"systemd-box {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
    return done.stdout


def _base_image(tool: Path, cache: Path) -> Path:
    """The provisioned image, built once (debootstrap, then IMAGE_PACKAGES) under a lock."""
    base = cache / IMAGE_VERSION
    ready = cache / f"{IMAGE_VERSION}.ready"
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists():
            return base
        shutil.rmtree(base, ignore_errors=True)
        started = time.monotonic()
        _run_tool(tool, "up", str(base), timeout=600)
        try:
            box = Box(tool, base)
            box.sh(
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                f"{' '.join(IMAGE_PACKAGES)} >/dev/null && apt-get clean",
                timeout=300,
            )
        finally:
            _run_tool(tool, "down", str(base), timeout=60)
        ready.write_text(f"built in {time.monotonic() - started:.0f} s\n")
        print(f"\nsystemd-box image built in {time.monotonic() - started:.0f} s", file=sys.stderr)
        return base


def _remove_stale_runs(tool: Path, cache: Path) -> None:
    """Copies left by runs that were killed: run-PID whose pytest process is gone."""
    for run in cache.glob("run-*"):
        if run.suffix:  # run-N.console.log and the like go with their directory
            continue
        try:
            os.kill(int(run.name.removeprefix("run-")), 0)
            continue  # still running (or the pid was reused: left for next time)
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        subprocess.run(["bash", str(tool), "down", str(run)], capture_output=True, timeout=60)
        shutil.rmtree(run, ignore_errors=True)
        for side in cache.glob(f"{run.name}.*"):
            side.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def box() -> Iterator[Box]:
    """A freshly booted copy of the image with this checkout at /src (read-only) and a
    writable copy of it at CHECKOUT_IN_BOX."""
    tool, why = _why_no_box()
    if tool is None:
        pytest.skip(why)
    cache = Path(os.environ.get("ORCHESTRATOR_BOX_CACHE", "/var/cache/orchestrator-system-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_runs(tool, cache)
    base = _base_image(tool, cache)
    run = cache / f"run-{os.getpid()}"
    shutil.rmtree(run, ignore_errors=True)
    subprocess.run(["cp", "-a", str(base), str(run)], check=True, timeout=300)
    the_box = Box(tool, run)
    try:
        _run_tool(tool, "up", str(run), str(ROOT), timeout=120)
        # sudo resolves the host name; a minimal image has no entry for it.
        the_box.sh('echo "127.0.1.1 $(hostname)" >> /etc/hosts')
        # The checkout as a person has it (not its venv, caches or git objects).
        the_box.sh(
            f"mkdir -p {CHECKOUT_IN_BOX} && tar -C /src --exclude=./.venv --exclude=./.git "
            "--exclude='*/__pycache__' --exclude=./.mypy_cache --exclude=./.ruff_cache "
            f"--exclude=./.pytest_cache -cf - . | tar -C {CHECKOUT_IN_BOX} -xf -"
        )
        # pip's cache of earlier runs: `make install-service` downloads the same wheels.
        if (cache / "pip").is_dir():
            shutil.copytree(cache / "pip", the_box.path("/root/.cache/pip"), dirs_exist_ok=True)
        yield the_box
    finally:
        if the_box.path("/root/.cache/pip").is_dir():
            shutil.copytree(
                the_box.path("/root/.cache/pip"), cache / "pip", dirs_exist_ok=True, symlinks=True
            )
        try:
            (cache / "last-run-journal.txt").write_text(
                the_box.sh("journalctl -b --no-pager -o short-precise", check=False)
            )
        except Exception:  # a box that never came up has no journal
            pass
        subprocess.run(["bash", str(tool), "down", str(run)], capture_output=True, timeout=60)
        shutil.rmtree(run, ignore_errors=True)
        for side in cache.glob(f"{run.name}.*"):
            side.unlink(missing_ok=True)


def handoff_doc(name: str, title: str = "") -> str:
    """A minimal valid handoff in the template."""
    return textwrap.dedent(f"""\
        # HANDOFF: {name} - PENDING

        **DATE**: 2026-12-04 | **PRIORITY**: MEDIUM | **STATUS**: PENDING

        ## STATUS UPDATE
        **Status**: PENDING
        **Priority**: MEDIUM - {title or "work item " + name}
        **Dependencies**: none
        **Progress**: 0% - not started

        ## IMPLEMENTATION PLAN
        ### PHASE 1: Do it
        - Make the change for {name}

        ## SUCCESS METRICS
        - **Overall**: the gate passes
        """)
