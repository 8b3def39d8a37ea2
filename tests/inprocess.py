"""The daemon's parts built in-process for the fast test layer (``pytest -m fast``).

Everything is real except the clock: a SQLite store in tmp_path, the repository made by
``conftest.make_repo``, real git, real gate processes. No daemon subprocess and no
socket: requests go straight to ``Handlers.dispatch`` from a real ``Session`` whose
transport records what it was sent. Time moves only when a test calls
``FakeClock.advance``, so a lease expires without waiting out its TTL.

Tests read store records only through the small helpers here (``state_of``), so a change
of the store's return types is adjusted in one place.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import git
from harness import handoff_doc, write_config

from orchestrator import __version__
from orchestrator import config as config_file
from orchestrator.blocking import Offload
from orchestrator.config import Config
from orchestrator.daemon.handlers import Handlers
from orchestrator.daemon.leases import LeaseManager
from orchestrator.daemon.server import Session
from orchestrator.git.workspace import Workspace
from orchestrator.merge.conflict_warnings import EarlyWarnings
from orchestrator.merge.queue import MergeQueue
from orchestrator.observe.metrics import Metrics
from orchestrator.protocol.jsonrpc import Request, RpcError
from orchestrator.store.sqlite import Store

# A wall-clock start far from the real now: a part that read time.time() behind the
# fake clock's back would see leases expired decades ago, or not yet granted.
FAKE_EPOCH = 2_000_000_000.0


class FakeClock:
    """A clock that moves only when told; wall and monotonic time move together."""

    def __init__(self, start: float = FAKE_EPOCH) -> None:
        self._wall = start
        self._monotonic = 1_000.0

    def now(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds``."""
        assert seconds >= 0, "time never goes back"
        self._wall += seconds
        self._monotonic += seconds


_ids = itertools.count(1)


@dataclass
class Peer:
    """A real ``Session`` on a recording transport: what a connection would have sent."""

    session: Session
    sent: list[dict[str, Any]] = field(default_factory=list)

    def notifications(self, method: str) -> list[dict[str, Any]]:
        """The params of every notification ``method`` sent to this peer."""
        return [m["params"] for m in self.sent if m.get("method") == method]


def peer(role: str = "worker", *, name: str = "w1", uid: int | None = None) -> Peer:
    """A connection that has passed ``initialize`` as ``role``."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    session = Session(
        id=f"s{next(_ids)}",
        uid=os.getuid() if uid is None else uid,
        gid=os.getgid(),
        pid=os.getpid(),
        send=send,
        role=role,
        worker_name=name if role == "worker" else "",
    )
    return Peer(session, sent)


@dataclass
class Parts:
    """One daemon's parts, wired as ``daemon.service`` wires them, on a fake clock."""

    repo: Path
    config: Config
    clock: FakeClock
    store: Store
    workspace: Workspace
    offload: Offload
    metrics: Metrics
    leases: LeaseManager
    merges: MergeQueue
    handlers: Handlers

    def changed(self) -> None:
        self.leases.wake()
        self.merges.wake()

    async def call(self, who: Peer, method: str, params: dict[str, Any] | None = None) -> Any:
        """A request as the server hands it over, answered by ``Handlers.dispatch``."""
        request = Request(method, params or {}, next(_ids), False)
        result = await self.handlers.dispatch(who.session, request)
        # As the peer would read it: a typed record the server puts on the wire is
        # compared here in its wire shape.
        to_wire = getattr(result, "to_wire", None)
        return to_wire() if callable(to_wire) else result

    async def call_error(
        self, who: Peer, method: str, params: dict[str, Any] | None = None
    ) -> RpcError:
        """The error a request is answered with (fails the test if it succeeds)."""
        try:
            result = await self.call(who, method, params)
        except RpcError as exc:
            return exc
        raise AssertionError(f"{method} succeeded ({result!r}); an error was expected")

    async def submit(self, *names: str, deps: str = "none") -> None:
        control = peer("control")
        docs = [handoff_doc(name, deps=deps) for name in names]
        await self.call(control, "handoff.submit", {"markdown": docs})

    def state_of(self, name: str) -> str:
        """A handoff's state as its wire name (the one place a store record is read)."""
        record: Any = self.store.detail(name)
        state = record["state"] if isinstance(record, dict) else record.state
        return str(getattr(state, "value", state))

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the daemon's metrics registry (0 when never observed)."""
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@asynccontextmanager
async def daemon_parts(
    tmp_path: Path,
    repo: Path,
    *,
    gates: str = "",
    merge: str = "",
    ttl_s: float = 30,
    leases: str = "",
) -> AsyncIterator[Parts]:
    """The parts of a daemon on ``repo``, with its state in ``tmp_path/state``."""
    config = config_file.load(
        write_config(tmp_path, repo, gates=gates, merge=merge, ttl_s=ttl_s, leases=leases)
    )
    config.state_dir.mkdir(parents=True, exist_ok=True)
    clock = FakeClock()
    store = Store.open(config.database)
    try:
        workspace = Workspace(
            config.repository_path, config.integration_branch, config.worktrees_dir
        )
        offload = Offload()
        metrics = Metrics(__version__)
        lease_manager = LeaseManager(config, store, workspace, offload, metrics, clock)
        parts: Parts

        def changed() -> None:
            parts.changed()

        merges = MergeQueue(config, store, workspace, offload, metrics, changed, clock=clock)
        handlers = Handlers(
            config,
            store,
            workspace,
            offload,
            lease_manager,
            merges,
            sessions=lambda: [],
            on_change=changed,
            warnings=EarlyWarnings(
                store, workspace, offload, config.integration_branch, clock=clock
            ),
            clock=clock,
        )
        parts = Parts(
            repo, config, clock, store, workspace, offload, metrics, lease_manager, merges, handlers
        )
        yield parts
    finally:
        store.close()


@dataclass
class Held:
    """A lease a test worker holds, as ``lease.acquire`` returned it."""

    who: Peer
    lease: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.lease["id"])

    @property
    def token(self) -> int:
        return int(self.lease["token"])

    @property
    def handoff(self) -> str:
        return str(self.lease["handoff"]["name"])

    def ids(self, **extra: Any) -> dict[str, Any]:
        """The params naming this lease, plus ``extra``."""
        return {"leaseId": self.id, "token": self.token, **extra}


async def acquire(parts: Parts, who: Peer | None = None) -> Held:
    """Acquire the next lease (there must be one)."""
    who = who or peer()
    result = await parts.call(who, "lease.acquire", {"waitS": 0})
    assert result["lease"] is not None, "nothing was dispatchable"
    return Held(who, result["lease"])


def commit_in(worktree: Path, files: dict[str, str], message: str = "work") -> str:
    """Commit ``files`` (path -> content) in a lease's worktree; the new head."""
    for rel, content in files.items():
        path = worktree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    git(worktree, "add", "-A")
    git(worktree, "commit", "-q", "-m", message)
    return git(worktree, "rev-parse", "HEAD")


async def work_and_report(
    parts: Parts, held: Held, files: dict[str, str], *, status: str = "completed"
) -> Any:
    """Commit ``files`` in the lease's worktree and report it as the worker would."""
    head = commit_in(Path(held.lease["worktree"]), files, f"{held.handoff}: work")
    report = {"status": status, "head": head, "summary": f"did {held.handoff}"}
    return await parts.call(held.who, "handoff.report", held.ids(report=report))
