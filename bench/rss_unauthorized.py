"""Daemon RSS before and after 150 connections from a uid it does not admit, each sending
up to 1 MiB with no newline (issue 12). Needs root: the peers run as ``orch-agent``.

    PYTHONPATH=. python -m bench.rss_unauthorized [CONNECTIONS]
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEERS = r"""
import os, socket, sys, time
path, uid, gid, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
os.setgid(gid); os.setgroups([]); os.setuid(uid)
chunk, held, sent = b"x" * 65536, [], 0
for _ in range(count):
    s = socket.socket(socket.AF_UNIX); s.connect(path); s.setblocking(False); held.append(s)
for _ in range(200):  # keep pushing while the daemon reads
    for s in held:
        for _ in range(16):
            try:
                sent += s.send(chunk)
            except OSError:
                break
    time.sleep(0.01)
print(sent, flush=True)
sys.stdin.read()
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 150
    user = pwd.getpwnam("orch-agent")
    root = Path(tempfile.mkdtemp(prefix="orch-rss-"))
    root.chmod(0o755)
    repo = root / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=b", "-c", "user.email=b@b",
         "commit", "-q", "--allow-empty", "-m", "init"], check=True,
    )
    config = root / "o.toml"
    config.write_text(
        f'[repository]\npath = "{repo}"\n[daemon]\nstate_dir = "{root}/state"\n'
        f'socket = "{root}/d.sock"\nsocket_mode = "0666"\n[metrics]\nlisten = ""\n'
    )
    daemon = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--config", str(config), "serve"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(root / "d.sock"))
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1)
        before = rss_kib(daemon.pid)
        peers = subprocess.Popen(
            [sys.executable, "-c", PEERS, str(root / "d.sock"), str(user.pw_uid),
             str(user.pw_gid), str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        assert peers.stdout is not None and peers.stdin is not None
        sent = int(peers.stdout.readline())
        after = rss_kib(daemon.pid)
        peers.stdin.close()
        peers.wait()
        print(f"{count} connections, {sent / 2**20:.1f} MiB sent: daemon RSS "
              f"{before / 1024:.1f} MB -> {after / 1024:.1f} MB")
    finally:
        daemon.terminate()
        daemon.wait()
        subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    if os.getuid() != 0:
        sys.exit("needs root (the peers run as orch-agent)")
    main()
