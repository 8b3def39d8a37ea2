"""``orchestrator status --watch`` in a real terminal (tmux), against a real daemon."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import WAIT_S, Conn, Daemon, control, handoff_doc, write_config
from test_page import acquire, heartbeat, work

from orchestrator.observe.board import Board, LeaseView, Outcome, Question, QueueEntry
from orchestrator.observe.watch import render_frame

TMUX = shutil.which("tmux")
# OSC 52 would write the operator's clipboard; the CSI sequences would wipe the screen
# and forge a line at the top.
OSC52 = "\x1b]52;c;cHduZWQ=\x07"
FORGE = "\x1b[2J\x1b[1;1HMERGING BLOCKED: FORGED"


class Tmux:
    """A private tmux server (its own socket) with one window running a command."""

    def __init__(self, socket: Path, command: list[str]) -> None:
        conf = socket.with_suffix(".conf")
        # Keep the pane after the view exits (to read its exit status); let applications
        # set the clipboard, so a leaked OSC 52 would show up as a paste buffer.
        conf.write_text("set -g remain-on-exit on\nset -g set-clipboard on\n")
        self.base = ["tmux", "-S", str(socket), "-f", str(conf)]
        subprocess.run(
            [*self.base, "new-session", "-d", "-s", "t", "-x", "150", "-y", "60",
             shlex.join(command)],
            check=True,
            timeout=30,
        )

    def tmux(self, *args: str) -> str:
        return subprocess.run(
            [*self.base, *args], check=True, capture_output=True, text=True, timeout=30
        ).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t")

    def wait_for(self, *needles: str) -> str:
        deadline = time.monotonic() + WAIT_S
        while True:
            screen = self.screen()
            if all(n in screen for n in needles):
                return screen
            if time.monotonic() > deadline:
                missing = [n for n in needles if n not in screen]
                raise AssertionError(f"the terminal never showed {missing}:\n{screen}")
            time.sleep(0.1)

    def buffers(self) -> str:
        return subprocess.run(
            [*self.base, "list-buffers"], capture_output=True, text=True, timeout=30
        ).stdout

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30)


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (.ci/run installs it)")
def test_the_watch_view_redraws_in_place_and_shows_escapes_as_text(
    tmp_path: Path, repo: Path
) -> None:
    config = write_config(tmp_path, repo, ttl_s=120)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    conns: list[Conn] = []
    term: Tmux | None = None
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("alpha"),
                                                              handoff_doc("asker")]})
        worker = Conn(daemon.socket)
        conns.append(worker)
        worker.initialize("worker", name="worker-one")
        alpha = acquire(worker, "alpha")
        heartbeat(worker, alpha, 10, "Phase one", f"copy{OSC52}then{FORGE}")

        # --socket after the command, as anywhere else. The exit status is written down
        # by a shell that ignores Ctrl-C itself (tmux's own record of it is racy).
        exit_file = tmp_path / "exit-status"
        view = shlex.join([sys.executable, "-m", "orchestrator", "status", "--watch",
                           "--interval", "0.3", "--socket", str(daemon.socket)])
        term = Tmux(
            tmp_path / "tmux.sock",
            ["sh", "-c", f"trap '' INT; {view}; echo $? > {shlex.quote(str(exit_file))}"],
        )
        screen = term.wait_for("Working now (1)", "alpha", "worker-one", " 10%", "Phase one")
        lines = screen.splitlines()
        assert lines[0].startswith("orchestrator: main at ")
        assert lines[2] == "merging is not blocked"
        # The escapes are visible characters: nothing was cleared, moved or copied.
        assert "copy␛]52;c;cHduZWQ=␇then␛[2J␛[1;1HMERGING BLOCKED: FORGED" in screen
        assert not any(line.startswith("MERGING BLOCKED") for line in lines)
        assert term.buffers() == ""

        # Progress changes in place.
        heartbeat(worker, alpha, 70, "Phase two", "nearly there")
        screen = term.wait_for(" 70%", "Phase two - nearly there")
        assert " 10%" not in screen and "Phase one" not in screen
        assert screen.count("orchestrator: main at") == 1

        # A handoff starts waiting for a person.
        asker_conn = Conn(daemon.socket)
        conns.append(asker_conn)
        asker_conn.initialize("worker", name="worker-two")
        asker = acquire(asker_conn, "asker")
        work(asker_conn, asker, "blocked", summary="Which database should I use?")
        term.wait_for("Waiting for a person (1)", "asker: Which database should I use?")

        # A merge appears.
        work(worker, alpha)
        screen = term.wait_for("Working now (0)", "alpha  merged")
        assert screen.count("orchestrator: main at") == 1

        # Ctrl-C ends the view, with status 0.
        term.tmux("send-keys", "-t", "t", "C-c")
        deadline = time.monotonic() + WAIT_S
        while not exit_file.exists() or not exit_file.read_text().strip():
            assert time.monotonic() < deadline, "the view did not end on Ctrl-C"
            time.sleep(0.1)
        assert exit_file.read_text().strip() == "0"
    finally:
        if term is not None:
            term.kill()
        for conn in conns:
            conn.close()
        daemon.stop()


def test_every_agent_written_string_reaches_the_terminal_visible() -> None:
    evil = f"x{OSC52}{FORGE}\r\x9b2J\u202e"
    board = Board(
        integration_branch="main",
        integration_tip="0" * 40,
        counts={"leased": 1},
        workers=1,
        merge_blocked=evil,
        queue=(QueueEntry(evil, evil, "reported", 10.0),),
        pending=(QueueEntry(evil, evil, "queued", None),),
        leases=(LeaseView(evil, evil, evil, 1, 50.0, evil, evil, 3.0),),
        questions=(Question(evil, evil, evil, (evil,), 1.0),),
        outcomes=(Outcome(evil, evil, "failed", 1.0, evil, None, evil, f"a\n{evil}"),),
    )
    frame = "\n".join(render_frame(board, width=10_000))
    for raw in ("\x1b", "\x07", "\r", "\x9b", "\u202e"):
        assert raw not in frame
    assert frame.count("␛]52;c;") >= 10
