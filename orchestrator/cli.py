"""The ``orchestrator`` command: the daemon, its control commands, the worker, the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from orchestrator import __version__
from orchestrator import config as config_module
from orchestrator.agent.client import Client, ConnectionLost
from orchestrator.observe import logs
from orchestrator.protocol.jsonrpc import RpcError

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator",
        description="Lease git worktrees to coding agents and land their work behind gates.",
    )
    parser.add_argument("--version", action="version", version=f"orchestrator {__version__}")
    parser.add_argument(
        "--config",
        help="config file (else $ORCHESTRATOR_CONFIG, "
        "./orchestrator.toml, /etc/orchestrator/orchestrator.toml)",
    )
    parser.add_argument(
        "--socket",
        help="daemon socket for client commands "
        "(else $ORCHESTRATOR_SOCKET, else daemon.socket from the config)",
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=None,
        help="json lines (default; journald-friendly) or console for people",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("serve", help="run the daemon in the foreground (as systemd does)")
    p = sub.add_parser("submit", help="submit handoff files (all or none)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("status", help="counts, workers, leases, merge queue")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("show", help="one handoff's full record")
    p.add_argument("name")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true")
    group.add_argument(
        "--markdown",
        action="store_true",
        help="render the handoff document with its report and integration result",
    )
    p = sub.add_parser("cancel", help="cancel a handoff (a held lease is revoked)")
    p.add_argument("name")
    p = sub.add_parser("retry", help="give a failed, conflict or cancelled handoff another go")
    p.add_argument("name")
    p = sub.add_parser("check-config", help="validate the config and say what to fix")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("worker", help="run an agent command for each leased handoff")
    p.add_argument("--name", default=None, help="worker name (default: host-pid)")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        dest="labels",
        help="a label this worker offers (repeatable)",
    )
    p.add_argument("--wait", type=float, default=30.0, help="long-poll seconds per acquire")
    p.add_argument("--max-handoffs", type=int, default=None, help="exit after this many handoffs")
    p.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="exit when no handoff came within --wait seconds",
    )
    p.add_argument(
        "agent", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the agent command, after --"
    )
    p = sub.add_parser("demo", help="run the whole flow on a sample repository")
    p.add_argument("--dir", default=None, help="where to build it (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the demo directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point."""
    args = build_parser().parse_args(argv)
    log_format = args.log_format or ("json" if args.command in ("serve", "worker") else "console")
    logs.configure(log_format, args.log_level)
    try:
        return _run(args)
    except config_module.ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConnectionLost as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RpcError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        errors = (exc.data or {}).get("errors") if isinstance(exc.data, dict) else None
        for problem in errors or []:
            where = problem.get("file") or f"document {problem.get('document')}"
            print(f"  {where}:{problem.get('line')}: {problem.get('message')}", file=sys.stderr)
        return 1


def _load_config(args: argparse.Namespace, *, required: bool) -> config_module.Config | None:
    path = config_module.find_config_path(args.config)
    if path is None:
        if required:
            raise config_module.ConfigError(
                "config",
                [
                    "no config file found: pass --config, set ORCHESTRATOR_CONFIG, or "
                    "create ./orchestrator.toml (see config/orchestrator.toml)"
                ],
            )
        return None
    return config_module.load(path)


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    if os.environ.get("ORCHESTRATOR_SOCKET"):
        return Path(os.environ["ORCHESTRATOR_SOCKET"])
    cfg = _load_config(args, required=False)
    if cfg is not None:
        return cfg.socket
    return Path(".orchestrator/orchestrator.sock")


async def _control(socket: Path, method: str, params: dict[str, Any]) -> Any:
    async with Client.connect(socket, role="control") as client:
        return await client.call(method, params)


def _call(args: argparse.Namespace, method: str, params: dict[str, Any]) -> Any:
    return anyio.run(_control, _socket_path(args), method, params)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True))


def _run(args: argparse.Namespace) -> int:
    command = args.command
    if command == "serve":
        from orchestrator.daemon.service import Daemon
        from orchestrator.store.sqlite import StateLocked

        cfg = _load_config(args, required=True)
        assert cfg is not None
        from orchestrator.git.workspace import GitError
        from orchestrator.groups import single_error

        try:
            anyio.run(Daemon(cfg).run)
        except KeyboardInterrupt:
            pass
        except Exception as exc:
            error = single_error(exc)
            # Start-up refusals a person can fix get one line, not a traceback.
            if isinstance(error, (StateLocked, GitError, RuntimeError, OSError)):
                print(f"error: {error}", file=sys.stderr)
                return EXIT_USAGE
            raise
        return 0
    if command == "check-config":
        cfg = _load_config(args, required=True)
        assert cfg is not None
        problems = _check_environment(cfg)
        if args.json:
            _print_json({"source": cfg.source, "problems": problems})
        else:
            print(f"{cfg.source}: configuration is valid")
            print(f"  repository   {cfg.repository_path} (branch {cfg.integration_branch})")
            print(f"  state dir    {cfg.state_dir}")
            print(f"  socket       {cfg.socket} (mode {cfg.socket_mode:04o})")
            print(f"  leases       ttl {cfg.lease_ttl_s:g} s, max {cfg.max_attempts} attempts")
            print(
                f"  merge        {cfg.merge_strategy}; conflict: {cfg.on_conflict}, "
                f"gate failure: {cfg.on_gate_failure}"
            )
            for gate in cfg.gates:
                print(
                    f"  gate         {gate.name}: {' '.join(gate.run)} "
                    f"(timeout {gate.timeout_s:g} s)"
                )
            print(f"  metrics      {cfg.metrics_listen or 'off'}")
            for problem in problems:
                print(f"warning: {problem}", file=sys.stderr)
        return 1 if problems else 0
    if command == "submit":
        documents = []
        for name in args.files:
            try:
                documents.append(Path(name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                print(f"error: cannot read {name}: {exc}", file=sys.stderr)
                return EXIT_USAGE
        try:
            result = _call(args, "handoff.submit", {"markdown": documents})
        except RpcError as exc:
            if isinstance(exc.data, dict):
                for problem in exc.data.get("errors") or []:
                    index = problem.get("document")
                    if isinstance(index, int) and 0 <= index < len(args.files):
                        problem["file"] = args.files[index]
            raise
        if args.json:
            _print_json(result)
        else:
            for name in result["names"]:
                print(f"submitted {name}")
        return 0
    if command == "status":
        result = _call(args, "status", {})
        if args.json:
            _print_json(result)
        else:
            print(format_status(result, _call(args, "handoff.list", {})["handoffs"]))
        return 0
    if command == "show":
        result = _call(args, "handoff.get", {"name": args.name})
        if args.json:
            _print_json(result)
        elif args.markdown:
            from orchestrator.handoff.completed import completed_document

            print(completed_document(result), end="")
        else:
            states = {h["name"]: h["state"] for h in _call(args, "handoff.list", {})["handoffs"]}
            print(format_record(result, states))
        return 0
    if command in ("cancel", "retry"):
        _call(args, f"handoff.{command}", {"name": args.name})
        print(f"{args.name}: {'cancelled' if command == 'cancel' else 'queued again'}")
        return 0
    if command == "worker":
        from orchestrator.agent.worker import WorkerOptions, default_name, main_sync

        agent = list(args.agent)
        if agent and agent[0] == "--":
            agent = agent[1:]
        if not agent:
            print(
                "error: give the agent command after --, e.g. orchestrator worker -- ./my-agent.sh",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if not 0 <= args.wait <= 300:
            print("error: --wait must be from 0 to 300 seconds", file=sys.stderr)
            return EXIT_USAGE
        options = WorkerOptions(
            socket=_socket_path(args),
            command=agent,
            name=args.name or default_name(),
            labels=tuple(args.labels),
            wait_s=args.wait,
            max_handoffs=args.max_handoffs,
            exit_when_idle=args.exit_when_idle,
        )
        return main_sync(options)
    if command == "demo":
        from orchestrator.demo import run_demo

        return run_demo(Path(args.dir) if args.dir else None, keep=args.keep)
    raise AssertionError(command)


def _check_environment(cfg: config_module.Config) -> list[str]:
    """Problems a valid file can still have on this machine."""
    problems = []
    if not (cfg.repository_path / ".git").exists() and not (cfg.repository_path / "HEAD").exists():
        problems.append(f"repository.path {cfg.repository_path} is not a git repository")
    else:
        try:
            import pygit2

            repo = pygit2.Repository(str(cfg.repository_path))
            if repo.lookup_branch(cfg.integration_branch) is None:
                problems.append(
                    f"branch {cfg.integration_branch!r} does not exist in {cfg.repository_path}"
                )
        except Exception as exc:  # any libgit2 failure is worth reporting, not crashing on
            problems.append(f"cannot open {cfg.repository_path}: {exc}")
    import shutil

    for gate in cfg.gates:
        exe = gate.run[0]
        if "/" not in exe and shutil.which(exe) is None:
            problems.append(f"gate {gate.name!r}: {exe!r} is not on PATH")
    return problems


def format_status(status: dict[str, Any], handoffs: list[dict[str, Any]]) -> str:
    """The human view of ``status`` plus the handoff list."""
    lines = [
        f"integration: {status['integrationBranch']} at {status['integrationTip'][:12]}",
        "counts: " + (", ".join(f"{k} {v}" for k, v in status["counts"].items() if v) or "none"),
        f"workers: {len(status['workers'])} connected, leases: {len(status['leases'])} active",
        "merge queue: " + (", ".join(_with_eta(status)) or "empty"),
    ]
    if status.get("mergeBlocked"):
        lines.append(f"MERGE BLOCKED: {status['mergeBlocked']}")
    if handoffs:
        lines.append("")
        width = max(len(h["name"]) for h in handoffs)
        for h in handoffs:
            progress = h.get("progress") or {}
            extra = ""
            if progress.get("percent") is not None:
                extra = f"  {progress['percent']:.0f}%"
            if progress.get("message"):
                extra += f" {progress['message']}"
            lines.append(
                f"{h['name']:<{width}}  {h['state']:<9}  {h['priority']:<6}  "
                f"attempt {h['attempt']}{extra}"
            )
    return "\n".join(lines)


def _with_eta(status: dict[str, Any]) -> list[str]:
    """The merge queue's names, each with its expected landing time when there is one."""
    etas = status.get("mergeQueueEtaS") or {}
    return [
        f"{name} (~{_eta(etas[name])})" if etas.get(name) is not None else name
        for name in status["mergeQueue"]
    ]


def _eta(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def format_record(record: dict[str, Any], states: dict[str, str] | None = None) -> str:
    """The human view of ``handoff.get``; ``states`` (name to state) explains a wait."""
    states = states or {}
    lines = [
        f"{record['name']}: {record['title']}",
        f"  state {record['state']}, priority {record['priority']}, attempt {record['attempt']}",
    ]
    if record.get("dependencies"):
        lines.append(
            "  depends on "
            + ", ".join(f"{d} ({states[d]})" if d in states else d for d in record["dependencies"])
        )
        stuck = [d for d in record["dependencies"] if states.get(d) in ("failed", "cancelled")]
        if record["state"] == "waiting" and stuck:
            lines.append(
                f"  waits until {', '.join(stuck)} is retried and merged "
                f"(orchestrator retry {stuck[0]}), or cancel this one"
            )
    if record.get("detail"):
        lines.append(f"  {record['detail']}")
    if record.get("conflicts"):
        lines.append("  conflicts: " + ", ".join(record["conflicts"]))
    if record.get("mergeCommit"):
        lines.append(f"  merged as {record['mergeCommit']}")
    if record.get("etaS") is not None:
        lines.append(f"  expected to land in ~{_eta(record['etaS'])}")
    for lease in record.get("leases", []):
        lines.append(
            f"  lease {lease['id']} by {lease['worker']} "
            f"(attempt {lease['attempt']}): {lease['endReason'] or 'active'}"
        )
    for gate in record.get("gates", []):
        verdict = "passed" if gate["exitStatus"] == 0 and not gate["timedOut"] else "FAILED"
        lines.append(
            f"  gate {gate['gate']} on {gate['candidate'][:12]}: {verdict} "
            f"in {gate['durationS']:.1f} s"
        )
    for report in record.get("reports", []):
        lines.append(
            f"  report (attempt {report['attempt']}): {report['status']} - "
            f"{report.get('summary', '')}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
