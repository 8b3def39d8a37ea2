"""The TOML configuration: where it is found, its defaults, and validation with clear errors.

Every problem names the file and the key, and says what is expected, so a user can fix the
file without reading this code. ``check-config`` prints the same messages.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from orchestrator.git.strategy import MERGE_STRATEGIES, MergeStrategy

SYSTEM_CONFIG = Path("/etc/orchestrator/orchestrator.toml")
FAILURE_POLICIES = ("requeue", "hold")
MAX_SPECULATIVE_WINDOW = 16
# How gates are confined (merge.gate_isolation): "auto" runs each in bubblewrap's PID and
# mount namespaces when it works here and says so when it does not; "bwrap" refuses to
# gate without them; "processes" only ends the gate's whole process tree.
GATE_ISOLATION_MODES = ("auto", "bwrap", "processes")

MAX_BATCH = 100


class ConfigError(ValueError):
    """The configuration cannot be used; ``problems`` lists each thing to fix."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}: " + "; ".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {p}" for p in self.problems)


@dataclass(frozen=True)
class GateConfig:
    """One validation gate: a command (argv, never a shell string) run on each candidate."""

    name: str
    run: tuple[str, ...]
    timeout_s: float = 900.0
    env: Mapping[str, str] = field(default_factory=dict)
    # A failed run is tried again this many times, each on a fresh checkout (flaky gates).
    retries: int = 0


@dataclass(frozen=True)
class WorkspaceConfig:
    """``[workspace]``: warm dependencies for the gate checkout.

    ``keep`` names ignored paths (e.g. ``.venv``, ``node_modules``) that survive the clean
    between gate runs while the cache key (the contents of ``cache_key_files`` in the
    candidate, with ``setup`` and ``keep``) is unchanged; ``setup`` runs in the checkout,
    like a gate, whenever that key changed."""

    setup: tuple[str, ...] = ()
    setup_timeout_s: float = 900.0
    keep: tuple[str, ...] = ()
    cache_key_files: tuple[str, ...] = ()
    # Untracked files (e.g. ".env") copied from repository.path into each lease directory
    # and the gate checkout after checkout (orchestrator.git.copy_files).
    copy_files: tuple[str, ...] = ()
    # Each live lease and each gate slot gets ports of its own (orchestrator.daemon.ports);
    # 0 turns it off.
    ports_per_lease: int = 10
    port_base: int = 20000


@dataclass(frozen=True)
class WorkerPoolConfig:
    """``[workers]``: agent workers the daemon starts and supervises itself."""

    count: int
    command: tuple[str, ...]
    labels: tuple[str, ...] = ()
    name: str = "worker"


# What a SIGHUP cannot change: the daemon holds these open (the lock, the database, the
# socket, the port, the repository) for as long as it runs.
RESTART_ONLY = (
    "repository_path",
    "integration_branch",
    "state_dir",
    "socket",
    "socket_mode",
    "metrics_listen",
    "store_lock_wait_s",
)


@dataclass(frozen=True)
class Config:
    """The whole configuration, with defaults filled in and paths made absolute."""

    source: str
    repository_path: Path
    integration_branch: str = "main"
    state_dir: Path = Path(".orchestrator")
    socket: Path = Path(".orchestrator/orchestrator.sock")
    socket_mode: int = 0o660
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    # Operators: granted role "control" by SO_PEERCRED (the daemon's uid and root always).
    control_uids: tuple[int, ...] = ()
    control_gids: tuple[int, ...] = ()
    max_message_bytes: int = 1024 * 1024
    send_timeout_s: float = 10.0
    # Connections one uid may hold at once (root and the daemon's uid are not capped).
    max_connections_per_uid: int = 64
    # An initialized connection with no request in flight is closed after this long;
    # None: the lease TTL.
    idle_timeout_s: float | None = None
    # How long a store write waits for another process's lock before it is refused.
    store_lock_wait_s: float = 30.0
    lease_ttl_s: float = 60.0
    heartbeat_interval_s: float = 15.0
    max_attempts: int = 3
    lease_max_duration_s: float = 86400.0
    gates: tuple[GateConfig, ...] = ()
    merge_strategy: MergeStrategy = MergeStrategy.MERGE
    on_conflict: str = "requeue"
    on_gate_failure: str = "requeue"
    gate_output_tail_bytes: int = 64 * 1024
    gate_sandbox: tuple[str, ...] = ()
    gate_isolation: str = "auto"
    metrics_listen: str = "127.0.0.1:9464"
    merge_paused: bool = False
    speculative_window: int = 1
    # Reuse a gate's pass on a tree it already passed on (same argv, env and timeout).
    gate_cache: bool = True
    # Up to this many reported handoffs merged into one candidate and gated once (1: off).
    max_batch: int = 1
    workers: WorkerPoolConfig | None = None
    workspace: WorkspaceConfig = field(default_factory=WorkspaceConfig)

    @property
    def worktrees_dir(self) -> Path:
        return self.state_dir / "worktrees"

    @property
    def database(self) -> Path:
        return self.state_dir / "orchestrator.sqlite3"


def find_config_path(explicit: str | None = None) -> Path | None:
    """Find the config file: ``--config``, ``$ORCHESTRATOR_CONFIG``, ``./orchestrator.toml``,
    then ``/etc/orchestrator/orchestrator.toml``. ``None`` when none exists."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("ORCHESTRATOR_CONFIG")
    if env:
        return Path(env)
    for candidate in (Path("orchestrator.toml"), SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def load(path: Path) -> Config:
    """Read and validate a config file; raises :class:`ConfigError` listing every problem."""
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            source, ["file not found (pass --config or set ORCHESTRATOR_CONFIG)"]
        ) from None
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror}"]) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"not UTF-8 text (byte {exc.start})"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"invalid TOML: {exc}"]) from exc
    return from_mapping(data, source=source, base_dir=path.resolve().parent)


class _Reader:
    """Collects problems instead of stopping at the first, so one run shows them all."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data
        self.problems: list[str] = []
        self.seen: dict[str, set[str]] = {}

    def table(self, name: str) -> Mapping[str, Any]:
        value = self.data.get(name, {})
        if not isinstance(value, Mapping):
            self.problems.append(f"[{name}] must be a table")
            return {}
        self.seen.setdefault(name, set())
        return value

    def get(self, table: str, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        section = self.table(table)
        self.seen.setdefault(table, set()).add(key)
        if key not in section:
            return default
        value = section[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a TOML `true` where a number belongs is a mistake.
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = (
                "a number"
                if set(kinds) == {int, float}
                else " or ".join(_type_name(k) for k in kinds)
            )
            self.problems.append(f"{table}.{key} must be {names}, got {value!r}")
            return default
        return value

    def unknown_keys(self) -> None:
        known_tables = {
            "repository",
            "daemon",
            "leases",
            "gates",
            "merge",
            "metrics",
            "workers",
            "workspace",
        }
        for name in self.data:
            if name not in known_tables:
                self.problems.append(
                    f"unknown table [{name}] (known: {', '.join(sorted(known_tables))})"
                )
        for table, keys in self.seen.items():
            section = self.data.get(table, {})
            if isinstance(section, Mapping):
                for key in section:
                    if key not in keys:
                        self.problems.append(f"unknown key {table}.{key} (a typo?)")


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        kind, kind.__name__
    )


def from_mapping(data: Mapping[str, Any], *, source: str, base_dir: Path) -> Config:
    """Build a :class:`Config` from parsed TOML; relative paths are taken from ``base_dir``."""
    r = _Reader(data)
    problems = r.problems

    def path_of(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base_dir / p)

    repo_value = r.get("repository", "path", str, None)
    if repo_value is None:
        problems.append("repository.path is required (the repository to integrate into)")
        repo_path = base_dir
    else:
        repo_path = path_of(repo_value)
    branch = r.get("repository", "integration_branch", str, "main")
    if not branch or branch.startswith("refs/") or " " in branch:
        problems.append(
            f'repository.integration_branch must be a short branch name like "main", got {branch!r}'
        )

    # DESIGN.md: the default is $STATE_DIRECTORY, else ./.orchestrator in the current
    # directory; a path written in the file is taken from the file's folder.
    state_default = os.environ.get("STATE_DIRECTORY", "").split(":")[0] or ".orchestrator"
    state_value = r.get("daemon", "state_dir", str, None)
    state_dir = path_of(state_value) if state_value is not None else Path(state_default).absolute()
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    socket_default = str(Path(runtime) / "orchestrator.sock") if runtime else ""
    socket_value = r.get("daemon", "socket", str, socket_default)
    socket = path_of(socket_value) if socket_value else state_dir / "orchestrator.sock"
    # AF_UNIX paths are limited to 108 bytes on Linux; fail here rather than at bind time.
    if len(os.fsencode(str(socket))) > 107:
        problems.append(
            f"daemon.socket path is {len(str(socket))} bytes; Unix sockets allow at most 107 "
            "(choose a shorter path)"
        )
    mode_value = r.get("daemon", "socket_mode", (str, int), "0660")
    socket_mode = 0o660
    try:
        socket_mode = int(mode_value, 8) if isinstance(mode_value, str) else int(mode_value)
        if not 0 <= socket_mode <= 0o777:
            raise ValueError
    except ValueError:
        problems.append(
            f'daemon.socket_mode must be an octal string like "0660", got {mode_value!r}'
        )
    uids = _int_list(r, "daemon", "allowed_uids")
    gids = _int_list(r, "daemon", "allowed_gids")
    control_uids = _int_list(r, "daemon", "control_uids")
    control_gids = _int_list(r, "daemon", "control_gids")
    max_bytes = r.get("daemon", "max_message_bytes", int, 1024 * 1024)
    send_timeout = float(r.get("daemon", "send_timeout_s", (int, float), 10))
    if send_timeout <= 0:
        problems.append(f"daemon.send_timeout_s must be positive, got {send_timeout}")
    if max_bytes < 1024:
        problems.append(f"daemon.max_message_bytes must be at least 1024, got {max_bytes}")
    per_uid = r.get("daemon", "max_connections_per_uid", int, 64)
    if per_uid < 1:
        problems.append(f"daemon.max_connections_per_uid must be at least 1, got {per_uid}")
    lock_wait = float(r.get("daemon", "store_lock_wait_s", (int, float), 30))
    if lock_wait <= 0:
        problems.append(f"daemon.store_lock_wait_s must be positive, got {lock_wait}")
    idle_value = r.get("daemon", "idle_timeout_s", (int, float), None)
    idle_timeout = None if idle_value is None else float(idle_value)
    if idle_timeout is not None and idle_timeout <= 0:
        problems.append(f"daemon.idle_timeout_s must be positive, got {idle_timeout}")

    ttl = float(r.get("leases", "ttl_s", (int, float), 60))
    if ttl <= 0:
        problems.append(f"leases.ttl_s must be positive, got {ttl}")
    heartbeat = float(r.get("leases", "heartbeat_interval_s", (int, float), max(ttl / 4, 0.05)))
    if not 0 < heartbeat < ttl:
        problems.append(
            f"leases.heartbeat_interval_s must be positive and below leases.ttl_s ({ttl}), "
            f"got {heartbeat}"
        )
    attempts = r.get("leases", "max_attempts", int, 3)
    if attempts < 1:
        problems.append(f"leases.max_attempts must be at least 1, got {attempts}")
    max_duration = float(r.get("leases", "max_duration_s", (int, float), 86400))
    if max_duration < 0:
        problems.append(
            f"leases.max_duration_s must be 0 (no bound) or positive, got {max_duration}"
        )

    strategy = r.get("merge", "strategy", str, "merge")
    if strategy not in MERGE_STRATEGIES:
        problems.append(
            f"merge.strategy must be one of {', '.join(MERGE_STRATEGIES)}, got {strategy!r}"
        )
    on_conflict = r.get("merge", "on_conflict", str, "requeue")
    on_gate_failure = r.get("merge", "on_gate_failure", str, "requeue")
    for key, value in (("on_conflict", on_conflict), ("on_gate_failure", on_gate_failure)):
        if value not in FAILURE_POLICIES:
            problems.append(
                f"merge.{key} must be one of {', '.join(FAILURE_POLICIES)}, got {value!r}"
            )
    paused = r.get("merge", "paused", bool, False)
    window = r.get("merge", "speculative_window", int, 1)
    if not 1 <= window <= MAX_SPECULATIVE_WINDOW:
        problems.append(
            f"merge.speculative_window must be from 1 to {MAX_SPECULATIVE_WINDOW}, got {window}"
        )
    gate_cache = r.get("merge", "gate_cache", bool, True)
    max_batch = r.get("merge", "max_batch", int, 1)
    if not 1 <= max_batch <= MAX_BATCH:
        problems.append(
            f"merge.max_batch must be from 1 (no batches) to {MAX_BATCH}, got {max_batch}"
        )
    tail = r.get("merge", "gate_output_tail_bytes", int, 64 * 1024)
    if tail < 256:
        problems.append(f"merge.gate_output_tail_bytes must be at least 256, got {tail}")
    sandbox = r.get("merge", "gate_sandbox", (list, str), [])
    if isinstance(sandbox, str) or not all(isinstance(a, str) and a for a in sandbox):
        problems.append(
            'merge.gate_sandbox must be an argv prefix (non-empty strings), e.g. ["bwrap", '
            f'"--ro-bind", "/", "/", ...], got {sandbox!r}'
        )
        sandbox = []
    isolation = r.get("merge", "gate_isolation", str, "auto")
    if isolation not in GATE_ISOLATION_MODES:
        problems.append(
            f"merge.gate_isolation must be one of {', '.join(GATE_ISOLATION_MODES)}, "
            f"got {isolation!r}"
        )

    listen = r.get("metrics", "listen", str, "127.0.0.1:9464")
    if listen:
        from orchestrator.observe.metrics import parse_listen

        try:
            parse_listen(listen)
        except ValueError as exc:
            problems.append(f"metrics.listen: {exc}")
    gates = _gates(data.get("gates", []), problems)
    workers = _workers(r)
    workspace = _workspace(r)
    r.unknown_keys()
    if problems:
        raise ConfigError(source, problems)
    return Config(
        source=source,
        repository_path=repo_path,
        integration_branch=branch,
        state_dir=state_dir,
        socket=socket,
        socket_mode=socket_mode,
        allowed_uids=uids,
        allowed_gids=gids,
        control_uids=control_uids,
        control_gids=control_gids,
        max_message_bytes=max_bytes,
        send_timeout_s=send_timeout,
        max_connections_per_uid=per_uid,
        idle_timeout_s=idle_timeout,
        store_lock_wait_s=lock_wait,
        lease_ttl_s=ttl,
        heartbeat_interval_s=heartbeat,
        max_attempts=attempts,
        lease_max_duration_s=max_duration,
        gates=gates,
        merge_strategy=MergeStrategy(strategy),  # checked above
        on_conflict=on_conflict,
        on_gate_failure=on_gate_failure,
        gate_output_tail_bytes=tail,
        gate_sandbox=tuple(sandbox),
        gate_isolation=isolation,
        metrics_listen=listen,
        merge_paused=paused,
        speculative_window=window,
        gate_cache=gate_cache,
        max_batch=max_batch,
        workers=workers,
        workspace=workspace,
    )


def _workspace(r: _Reader) -> WorkspaceConfig:
    def strings(key: str, what: str) -> tuple[str, ...]:
        value = r.get("workspace", key, list, [])
        if not all(isinstance(v, str) and v for v in value):
            r.problems.append(f"workspace.{key} must be a list of non-empty strings ({what})")
            return ()
        return tuple(value)

    def relative_paths(key: str, example: str) -> tuple[str, ...]:
        paths = strings(key, f"paths relative to the repository root, e.g. {example}")
        for path in paths:
            parts = Path(path).parts
            if Path(path).is_absolute() or ".." in parts or not parts or parts[0] == ".git":
                r.problems.append(
                    f"workspace.{key}: {path!r} must be a path inside the checkout, relative "
                    "to its root (no leading /, no .., not .git)"
                )
                return ()
        return tuple(p.strip("/") for p in paths)

    setup = strings("setup", 'an argv, e.g. ["uv", "sync", "--frozen"]')
    timeout = r.get("workspace", "setup_timeout_s", (int, float), 900.0)
    if timeout <= 0:
        r.problems.append(f"workspace.setup_timeout_s must be positive, got {timeout}")
    keep = relative_paths("keep", '[".venv", "node_modules"]')
    key_files = relative_paths("cache_key_files", '["uv.lock", "package-lock.json"]')
    if keep and not key_files:
        r.problems.append(
            'workspace.keep needs workspace.cache_key_files (e.g. ["uv.lock"]): kept '
            "paths are rebuilt when those files change"
        )
    copy_files = relative_paths("copy_files", '[".env"]')
    per = r.get("workspace", "ports_per_lease", int, 10)
    port_base = r.get("workspace", "port_base", int, 20000)
    if not 0 <= per <= 1000:
        r.problems.append(f"workspace.ports_per_lease must be from 0 (off) to 1000, got {per}")
    elif per and not 1024 <= port_base <= 65535 - (MAX_SPECULATIVE_WINDOW + 1) * per + 1:
        r.problems.append(
            f"workspace.port_base must leave room above it for {MAX_SPECULATIVE_WINDOW} gate "
            f"slots and a lease of {per} ports each (from 1024 to "
            f"{65535 - (MAX_SPECULATIVE_WINDOW + 1) * per + 1}), got {port_base}"
        )
    return WorkspaceConfig(
        setup=setup,
        setup_timeout_s=float(timeout),
        keep=keep,
        cache_key_files=key_files,
        copy_files=copy_files,
        ports_per_lease=per,
        port_base=port_base,
    )


def _workers(r: _Reader) -> WorkerPoolConfig | None:
    count = r.get("workers", "count", int, 0)
    command = r.get("workers", "command", (list, str), [])
    if isinstance(command, str):
        # A string is a shell command line, as AGENT_COMMAND in orchestrator-worker@.service.
        command = ["/bin/sh", "-c", command] if command.strip() else []
    labels = r.get("workers", "labels", list, [])
    name = r.get("workers", "name", str, "worker")
    problems = r.problems
    if count < 0 or count > 256:
        problems.append(f"workers.count must be from 0 to 256, got {count}")
    if not all(isinstance(a, str) for a in command):
        problems.append(
            "workers.command must be the agent's argv (a list of strings) or a shell command line"
        )
        command = []
    elif count > 0 and not command:
        problems.append(
            'workers.command is required when workers.count > 0, e.g. ["my-agent", "--auto"]'
        )
    if not all(isinstance(label, str) and label for label in labels):
        problems.append('workers.labels must be a list of non-empty strings, e.g. ["python"]')
        labels = []
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        problems.append(f"workers.name must be letters, digits, '-', '_' or '.', got {name!r}")
    if count <= 0 or not command:
        return None
    return WorkerPoolConfig(count=count, command=tuple(command), labels=tuple(labels), name=name)


def reloaded(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with every restart-only setting kept from ``old``, and the names of those
    that the new file would have changed (a SIGHUP cannot apply them)."""
    ignored = [key for key in RESTART_ONLY if getattr(old, key) != getattr(new, key)]
    return replace(new, **{key: getattr(old, key) for key in RESTART_ONLY}), ignored


def _int_list(r: _Reader, table: str, key: str) -> tuple[int, ...]:
    value = r.get(table, key, list, [])
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        r.problems.append(f"{table}.{key} must be a list of non-negative integers, got {value!r}")
        return ()
    return tuple(value)


def _gates(raw: Any, problems: list[str]) -> tuple[GateConfig, ...]:
    if not isinstance(raw, list):
        problems.append("gates must be an array of tables: write each gate as [[gates]]")
        return ()
    gates: list[GateConfig] = []
    names: set[str] = set()
    for index, item in enumerate(raw, start=1):
        where = f"gates #{index}"
        if not isinstance(item, Mapping):
            problems.append(f"{where} must be a table")
            continue
        unknown = set(item) - {"name", "run", "timeout_s", "env", "retries"}
        for key in sorted(unknown):
            problems.append(
                f"{where}: unknown key {key!r} (known: name, run, timeout_s, env, retries)"
            )
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.append(f'{where}: name is required, e.g. name = "tests"')
            name = f"gate-{index}"
        elif name in names:
            problems.append(f"{where}: duplicate gate name {name!r}")
        names.add(name)
        run = item.get("run")
        if isinstance(run, str):
            problems.append(
                f'{where} ({name}): run must be an argv list, e.g. ["make", "test"], not a '
                'shell string (wrap it as ["sh", "-c", ...] if you need a shell)'
            )
            run = None
        elif not (isinstance(run, list) and run and all(isinstance(a, str) for a in run)):
            problems.append(f"{where} ({name}): run must be a non-empty list of strings")
            run = None
        timeout = item.get("timeout_s", 900)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            problems.append(f"{where} ({name}): timeout_s must be a positive number")
            timeout = 900
        env = item.get("env", {})
        if not (isinstance(env, Mapping) and all(isinstance(v, str) for v in env.values())):
            problems.append(f"{where} ({name}): env must be a table of strings")
            env = {}
        retries = item.get("retries", 0)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            problems.append(f"{where} ({name}): retries must be a whole number from 0 to 10")
            retries = 0
        if run is not None:
            gates.append(
                GateConfig(
                    name=name,
                    run=tuple(run),
                    timeout_s=float(timeout),
                    env=dict(env),
                    retries=retries,
                )
            )
    return tuple(gates)
