"""The ``orchestrator`` command: the daemon, its control commands, the worker, the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio

from orchestrator import __version__
from orchestrator import config as config_module
from orchestrator.agent.client import Client, ConnectionLost
from orchestrator.observe import logs
from orchestrator.observe.terminal import visible
from orchestrator.protocol.jsonrpc import RpcError, rfc3339
from orchestrator.protocol.records import HandoffDetail, HandoffSummary, NeedsInput
from orchestrator.store.states import State

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


class UnreadableReply(RuntimeError):
    """The daemon's reply is not the record this CLI reads (a daemon of another version)."""


def _add_global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes, before or after the command's name.

    The subcommands get them too, with suppressed defaults: argparse copies a subcommand's
    values over the top-level ones, and an option left out after the command must not wipe
    out the same option given before it.
    """

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--config",
        default=default(None),
        help="config file (else $ORCHESTRATOR_CONFIG, "
        "./orchestrator.toml, /etc/orchestrator/orchestrator.toml)",
    )
    parser.add_argument(
        "--socket",
        default=default(None),
        help="daemon socket for client commands "
        "(else $ORCHESTRATOR_SOCKET, else daemon.socket from the config)",
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=default(None),
        help="json lines (default; journald-friendly) or console for people",
    )
    parser.add_argument(
        "--log-level",
        default=default("info"),
        choices=("debug", "info", "warning", "error"),
    )


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: it also takes the global options (``check-config --config X``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_global_options(self, defaults=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator",
        description="Lease git worktrees to coding agents and land their work behind gates.",
    )
    parser.add_argument("--version", action="version", version=f"orchestrator {__version__}")
    _add_global_options(parser, defaults=True)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )
    sub.add_parser("serve", help="run the daemon in the foreground (as systemd does)")
    p = sub.add_parser("submit", help="submit handoff files (all or none)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("status", help="counts, workers, leases, merge queue")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--watch", action="store_true", help="a live view, redrawn in place (Ctrl-C ends it)"
    )
    p.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
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
    p = sub.add_parser("answer", help="answer the question a handoff's agent is waiting on")
    p.add_argument("name")
    p.add_argument("text", metavar="TEXT", help="the answer (one of its choices, if it gave any)")
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
        "--agent",
        dest="recipe",
        default=None,
        metavar="NAME",
        help="run a known agent CLI with its MCP config for each lease: claude, codex, "
        "gemini, opencode, goose or aider (arguments after -- are added to its own)",
    )
    p.add_argument(
        "agent", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the agent command, after --"
    )
    p = sub.add_parser("init", help="write an orchestrator.toml for the repository you are in")
    p.add_argument("--force", action="store_true", help="replace an existing orchestrator.toml")
    p = sub.add_parser(
        "mcp", help="stdio MCP server for an agent, acting for its worker's lease only"
    )
    p.add_argument(
        "--channel",
        default=None,
        help="the worker's lease channel (default: $ORCHESTRATOR_AGENT_SOCKET)",
    )
    p = sub.add_parser("demo", help="run the whole flow on a sample repository")
    p.add_argument("--dir", default=None, help="where to build it (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the demo directory")
    p.add_argument(
        "--mcp",
        action="store_true",
        help="agents are the claude recipe on a stand-in CLI that talks MCP",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point."""
    args = build_parser().parse_args(argv)
    log_format = args.log_format or ("json" if args.command in ("serve", "worker") else "console")
    # stdout is the MCP server's protocol stream: its logs go to stderr.
    logs.configure(log_format, args.log_level, sys.stderr if args.command == "mcp" else None)
    try:
        return _run(args)
    except config_module.ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConnectionLost as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except UnreadableReply as exc:
        print(f"error: {visible(str(exc))}", file=sys.stderr)
        return 1
    except RpcError as exc:
        print(f"error {exc.code}: {visible(exc.message)}", file=sys.stderr)
        errors = (exc.data or {}).get("errors") if isinstance(exc.data, dict) else None
        for problem in errors or []:
            where = problem.get("file") or f"document {problem.get('document')}"
            print(
                f"  {visible(str(where))}:{problem.get('line')}: "
                f"{visible(str(problem.get('message')))}",
                file=sys.stderr,
            )
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


def _handoffs(args: argparse.Namespace) -> list[HandoffSummary]:
    """Every handoff, as ``handoff.list`` summarizes it."""
    wire = _call(args, "handoff.list", {})
    try:
        return [HandoffSummary.from_wire(h) for h in wire["handoffs"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise UnreadableReply(f"the daemon's handoff.list result cannot be read: {exc}") from exc


def _detail(wire: Any) -> HandoffDetail:
    """A ``handoff.get`` result as its record."""
    try:
        return HandoffDetail.from_wire(wire)
    except ValueError as exc:
        raise UnreadableReply(f"the daemon's handoff.get result cannot be read: {exc}") from exc


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True))


def _run(args: argparse.Namespace) -> int:
    command = args.command
    if command == "serve":
        from orchestrator.daemon.service import Daemon
        from orchestrator.store.sqlite import StoreError

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
            # StoreError: another daemon on the state dir, a corrupt or locked store.
            if isinstance(error, (StoreError, GitError, RuntimeError, OSError)):
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
                # Bytes, decoded as they are: read_text() would turn CRLF into LF, and the
                # stored body must be exactly the file.
                documents.append(Path(name).read_bytes().decode("utf-8"))
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
    if command == "status" and args.watch:
        from orchestrator.observe.watch import run_watch

        if args.json or not 0.1 <= args.interval <= 3600:
            print("error: --watch takes no --json, and --interval 0.1 to 3600 s", file=sys.stderr)
            return EXIT_USAGE
        return run_watch(_socket_path(args), args.interval)
    if command == "status":
        result = _call(args, "status", {})
        if args.json:
            _print_json(result)
        else:
            print(format_status(result, _handoffs(args)))
        return 0
    if command == "show":
        result = _call(args, "handoff.get", {"name": args.name})
        if args.json:
            _print_json(result)
        elif args.markdown:
            from orchestrator.handoff.completed import completed_document

            document = completed_document(_detail(result))
            # On a terminal the agent-written parts must not reach it raw; into a pipe or
            # file the document goes as it is.
            if sys.stdout.isatty():
                document = visible(document, keep_newlines=True)
            print(document, end="")
        else:
            states = {h.name: str(h.state) for h in _handoffs(args)}
            print(format_record(_detail(result), states))
        return 0
    if command in ("cancel", "retry"):
        _call(args, f"handoff.{command}", {"name": args.name})
        print(f"{args.name}: {'cancelled' if command == 'cancel' else 'queued again'}")
        return 0
    if command == "answer":
        _call(args, "handoff.answer", {"name": args.name, "answer": args.text})
        print(f"{args.name}: answered")
        return 0
    if command == "worker":
        from orchestrator.agent.worker import WorkerOptions, default_name, main_sync

        agent = list(args.agent)
        if agent and agent[0] == "--":
            agent = agent[1:]
        recipe = None
        if args.recipe is not None:
            import shutil

            from orchestrator.agent.recipes import recipe as find_recipe

            try:
                recipe = find_recipe(args.recipe)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_USAGE
            if shutil.which(recipe.executable) is None:
                print(
                    f"error: {recipe.executable!r} is not on PATH; install {recipe.name} or "
                    "put its directory on PATH",
                    file=sys.stderr,
                )
                return EXIT_USAGE
        if not agent and recipe is None:
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
            recipe=recipe,
        )
        return main_sync(options)
    if command == "init":
        from orchestrator import config_starter

        try:
            written = config_starter.write_starter_config(Path.cwd(), force=args.force)
        except config_starter.InitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"wrote {written.path}")
        print(f"  repository   {written.repository} (branch {written.branch})")
        print(f"  state dir    {written.state_dir}")
        if written.gate is None:
            print("  gate         none found: add a [[gates]] table (see the comment)")
        else:
            print(f"  gate         {' '.join(written.gate.run)} (a guess: {written.gate.reason})")
        print("next:")
        for line in config_starter.next_commands(written, Path.cwd()):
            print(f"  {line}")
        return 0
    if command == "mcp":
        from orchestrator.agent.mcp_server import main as mcp_main

        return mcp_main(args.channel)
    if command == "demo":
        from orchestrator.demo import run_demo

        return run_demo(Path(args.dir) if args.dir else None, keep=args.keep, mcp=args.mcp)
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


def format_status(status: dict[str, Any], handoffs: Sequence[HandoffSummary]) -> str:
    """The human view of ``status`` plus the handoff list; every string from the daemon
    (much of it agent-written) has its control characters made visible."""
    v = _visible
    lines = [
        f"integration: {v(status['integrationBranch'])} at {v(status['integrationTip'])[:12]}",
        "counts: " + (", ".join(f"{k} {v}" for k, v in status["counts"].items() if v) or "none"),
        f"workers: {len(status['workers'])} connected, leases: {len(status['leases'])} active",
        "merge queue: " + (", ".join(_with_eta(status)) or "empty"),
    ]
    if status.get("mergeBlocked"):
        lines.append(f"MERGE BLOCKED: {v(status['mergeBlocked'])}")
    isolation = status.get("gateIsolation")
    if isolation and not isolation.get("namespaces"):
        lines.append(f"GATES NOT SANDBOXED: {v(str(isolation.get('detail')))}")
    moved = status.get("integrationMovedOutside")
    if moved:
        lines.append(
            f"INTEGRATION BRANCH MOVED OUTSIDE THE QUEUE: {moved['count']} time(s), last "
            f"{str(moved['from'])[:12]} -> {str(moved['to'])[:12]} at {v(str(moved['at']))}"
        )
    if status.get("needsInput"):
        lines.append(
            f"waiting for an answer: {status['needsInput']} (orchestrator answer NAME TEXT)"
        )
    if handoffs:
        lines.append("")
        width = max(len(v(h.name)) for h in handoffs)
        for h in handoffs:
            progress = h.progress
            extra = ""
            if progress is not None and progress.percent is not None:
                extra = f"  {progress.percent:.0f}%"
            if progress is not None and progress.message:
                extra += f" {v(progress.message)}"
            lines.append(
                f"{v(h.name):<{width}}  {v(str(h.state)):<9}  {v(h.priority):<6}  "
                f"attempt {h.attempt}{extra}"
            )
            if h.needs_input is not None:
                lines.append(f"{'':<{width}}  asks: {_question_text(h.needs_input)}")
    return "\n".join(lines)


def _question_text(needs_input: NeedsInput) -> str:
    """A waiting question on one line, its choices after it; agent-written, so made visible."""
    text = visible(needs_input.question)
    choices = needs_input.choices
    if choices:
        text += " [" + " | ".join(visible(str(c)) for c in choices) + "]"
    return text


def _with_eta(status: dict[str, Any]) -> list[str]:
    """The merge queue's names, each with its expected landing time when there is one."""
    etas = status.get("mergeQueueEtaS") or {}
    return [
        f"{name} (~{_eta(etas[name])})" if etas.get(name) is not None else name
        for name in status["mergeQueue"]
    ]


def _eta(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def format_record(record: HandoffDetail, states: Mapping[str, str] | None = None) -> str:
    """The human view of ``handoff.get``; ``states`` (name to state) explains a wait.
    Every string from the daemon has its control characters made visible."""
    states = states or {}
    v = _visible
    summary = record.summary
    lines = [
        f"{v(summary.name)}: {v(summary.title)}",
        f"  state {v(str(summary.state))}, priority {v(summary.priority)}, "
        f"attempt {summary.attempt}",
    ]
    if summary.dependencies:
        lines.append(
            "  depends on "
            + ", ".join(
                f"{v(d)} ({v(states[d])})" if d in states else v(d) for d in summary.dependencies
            )
        )
        stuck = [
            d for d in summary.dependencies if states.get(d) in (State.FAILED, State.CANCELLED)
        ]
        if summary.state is State.WAITING and stuck:
            lines.append(
                f"  waits until {', '.join(map(v, stuck))} is retried and merged "
                f"(orchestrator retry {v(stuck[0])}), or cancel this one"
            )
    if record.detail:
        lines.append(f"  {v(record.detail)}")
    if summary.needs_input is not None:
        lines.append(
            f"  WAITING FOR AN ANSWER (asked {rfc3339(summary.needs_input.asked_at)}): "
            f"{_question_text(summary.needs_input)}"
        )
        lines.append(f"    answer with: orchestrator answer {summary.name} TEXT")
    if record.conflicts:
        lines.append("  conflicts: " + ", ".join(map(v, record.conflicts)))
    if record.merge_commit:
        lines.append(f"  merged as {v(record.merge_commit)}")
    if record.eta_s is not None:
        lines.append(f"  expected to land in ~{_eta(record.eta_s)}")
    for lease in record.leases:
        # No token: handoff.get never carries one (only the lease's holder sees it).
        lines.append(
            f"  lease {v(lease.id)} by {v(lease.worker)} "
            f"(attempt {lease.attempt}): {v(lease.end_reason or 'active')}"
        )
    for gate in record.gates:
        verdict = "passed" if gate.passed else "FAILED"
        lines.append(
            f"  gate {v(gate.gate)} on {v(gate.candidate)[:12]}: {verdict} "
            f"in {gate.duration_s:.1f} s"
        )
    for report in record.reports:
        lines.append(
            f"  report (attempt {report.attempt}): {v(report.report.status)} - "
            f"{v(report.report.summary or '')}"
        )
    return "\n".join(lines)


def _visible(value: Any) -> str:
    """A daemon-sent value as text safe for a terminal (it may be agent-written)."""
    return visible(value if isinstance(value, str) else str(value))


if __name__ == "__main__":
    sys.exit(main())
