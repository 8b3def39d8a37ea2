"""Agent-written text cannot forge a commit's trailers or the operator's terminal, and a
submitted handoff is stored byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import git
from harness import Conn, Daemon, control, handoff_doc, wait_for, write_config

from orchestrator.merge import commit_message

pytestmark = pytest.mark.slow

FORGED = "Handoff: someone-else\nSigned-off-by: Mallory <m@evil.invalid>"
ATTACKS = {
    # The attack: git reads a message as a C string, so a NUL ends it.
    "nul": f"all done\n\n{FORGED}\x00",
    # A "---" line is where git interpret-trailers thinks a patch starts.
    "divider": f"all done\n\n{FORGED}\n---\nthe rest",
    # The scissors line: everything below it is ignored.
    "scissors": f"all done\n\n{FORGED}\n# ------------------------ >8 ------------------------\nx",
    # Control characters: an escape sequence, a carriage return, a line separator.
    "controls": f"done \x1b]52;c;ZXZpbA==\x07\r{FORGED}\u2028Acked-by: M",
}


def _trailers(repo: Path, commit: str) -> str:
    message = git(repo, "log", "-1", "--format=%B", commit)
    parsed = subprocess.run(
        ["git", "interpret-trailers", "--parse"], input=message, capture_output=True,
        text=True, check=True, cwd=repo,
    )
    return parsed.stdout


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_summary_cannot_forge_the_merge_commits_trailers(
    tmp_path: Path, repo: Path, attack: str
) -> None:
    daemon = Daemon(write_config(tmp_path, repo), tmp_path / "daemon.log").start()
    conn = Conn(daemon.socket)
    try:
        name = f"forge-{attack}"
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc(name)]})
        conn.initialize("worker")
        lease = conn.request("lease.acquire", {"waitS": 30})["result"]["lease"]
        worktree = Path(lease["worktree"])
        (worktree / "work.txt").write_text("work\n")
        git(worktree, "add", "-A")
        git(worktree, "commit", "-q", "-m", "the work")
        head = git(worktree, "rev-parse", "HEAD")
        reply = conn.request("handoff.report", {
            "leaseId": lease["id"], "token": lease["token"],
            "report": {"status": "completed", "summary": ATTACKS[attack], "head": head},
        })
        assert reply.get("result") == {"accepted": True}, reply
        record = wait_for(
            lambda: (r := control(daemon.socket, "handoff.get", {"name": name}))["state"]
            == "merged" and r, "the merge")
        commit = record["mergeCommit"]
        assert _trailers(repo, commit) == (
            f"Handoff: {name}\nAttempt: 1\nGates: none configured\nGated: alone\n"
        )
        message = git(repo, "log", "-1", "--format=%B", commit)
        assert "all done" in message or "done" in message
        assert not any(c in message for c in "\x00\x1b\x07\r\u2028")
    finally:
        conn.close()
        daemon.stop()


def test_commit_text_keeps_plain_lines_and_drops_controls() -> None:
    expected = "fixed   it\n\n- one\n- two"
    assert commit_message.body("fixed   it\n\n\n- one\r\n- two\n") == expected
    assert commit_message.body("a\x00b\tc\x1b[2Jd\u202ee") == "ab\tc[2Jde"
    assert commit_message.body("---\n--- x\n# -------- >8 --------\n----") == (
        " ---\n --- x\n # -------- >8 --------\n----"
    )
    assert commit_message.one_line("title\nwith\x07 bell") == "title with bell"


OSC52 = "\x1b]52;c;cm0gLXJmIH4K\x07"
FAKE_LINE = "\r\x1b[2K\nFORGED  merged     HIGH    attempt 1\x1b[1A"


def _cli(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "--socket", str(socket), *args],
        capture_output=True, text=True, timeout=120,
    )


def test_status_and_show_make_an_agents_escape_sequences_visible(
    tmp_path: Path, repo: Path
) -> None:
    daemon = Daemon(write_config(tmp_path, repo, merge="paused = true"),
                    tmp_path / "daemon.log").start()
    conn = Conn(daemon.socket)
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("escapes")]})
        conn.initialize("worker", name=f"w{OSC52}")
        lease = conn.request("lease.acquire", {"waitS": 30})["result"]["lease"]
        ident = {"leaseId": lease["id"], "token": lease["token"]}
        beat = conn.request("lease.heartbeat", {
            **ident, "progress": {"percent": 50, "message": f"copying {OSC52}{FAKE_LINE}"}})
        assert "result" in beat, beat
        status = _cli(daemon.socket, "status")
        assert status.returncode == 0, status.stderr
        conn.request("lease.release", {**ident, "reason": f"bye {OSC52}{FAKE_LINE}"})
        show = _cli(daemon.socket, "show", "escapes")
        assert show.returncode == 0, show.stderr
        for out in (status.stdout, show.stdout):
            assert not any(c in out for c in "\x1b\x07\r"), out
            # The forged line stays inside its own line, shown for what it is.
            assert not any(line.startswith("FORGED") for line in out.splitlines()), out
            assert "␛]52;c;" in out
    finally:
        conn.close()
        daemon.stop()


def test_submit_stores_the_file_byte_for_byte(tmp_path: Path, repo: Path) -> None:
    daemon = Daemon(write_config(tmp_path, repo, merge="paused = true"),
                    tmp_path / "daemon.log").start()
    try:
        document = handoff_doc("crlf").replace("\n", "\r\n").encode()
        path = tmp_path / "crlf.md"
        path.write_bytes(document)
        submitted = _cli(daemon.socket, "submit", str(path))
        assert submitted.returncode == 0, submitted.stderr
        body = control(daemon.socket, "handoff.get", {"name": "crlf"})["body"]
        assert body.encode() == document
    finally:
        daemon.stop()


def test_show_markdown_on_a_terminal_makes_escapes_visible(tmp_path: Path, repo: Path) -> None:
    import os
    import pty

    daemon = Daemon(write_config(tmp_path, repo, merge="paused = true"),
                    tmp_path / "daemon.log").start()
    conn = Conn(daemon.socket)
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("doc-escapes")]})
        conn.initialize("worker")
        lease = conn.request("lease.acquire", {"waitS": 30})["result"]["lease"]
        worktree = Path(lease["worktree"])
        (worktree / "work.txt").write_text("work\n")
        git(worktree, "add", "-A")
        git(worktree, "commit", "-q", "-m", "the work")
        head = git(worktree, "rev-parse", "HEAD")
        reply = conn.request("handoff.report", {
            "leaseId": lease["id"], "token": lease["token"],
            "report": {"status": "completed", "summary": f"done {OSC52}", "head": head},
        })
        assert reply.get("result") == {"accepted": True}, reply
        leader, follower = pty.openpty()
        try:
            shown = subprocess.run(
                [sys.executable, "-m", "orchestrator", "--socket", str(daemon.socket), "show",
                 "--markdown", "doc-escapes"],
                stdout=follower, stderr=subprocess.PIPE, timeout=120,
            )
            os.close(follower)
            follower = -1
            out = b""
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the terminal's other end is closed and drained
                    break
                if not chunk:
                    break
                out += chunk
        finally:
            if follower != -1:
                os.close(follower)
            os.close(leader)
        assert shown.returncode == 0, shown.stderr
        text = out.decode()
        assert "done ␛]52;c;" in text and "\x1b" not in text and "\x07" not in text, text
        # Into a pipe the document goes as it is.
        piped = _cli(daemon.socket, "show", "--markdown", "doc-escapes")
        assert f"done {OSC52}" in piped.stdout
    finally:
        conn.close()
        daemon.stop()
