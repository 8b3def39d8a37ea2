"""The protocol's methods: each request is checked, then handed to the store, the lease
manager or the merge queue. Store refusals become the error codes of PROTOCOL.md."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from orchestrator.blocking import Offload
from orchestrator.clock import SYSTEM_CLOCK, Clock
from orchestrator.config import Config
from orchestrator.daemon.leases import LeaseManager
from orchestrator.daemon.server import Session
from orchestrator.git.workspace import Workspace
from orchestrator.handoff import template as handoff_model
from orchestrator.merge.conflict_warnings import HEAD_PATTERN, ConflictWarning, EarlyWarnings
from orchestrator.merge.queue import MergeQueue
from orchestrator.observe import logs
from orchestrator.protocol.asking import (
    OpenQuestion,
    answer_from_wire,
    answered_to_wire,
    question_from_wire,
)
from orchestrator.protocol.jsonrpc import (
    DUPLICATE_HANDOFF,
    INTERNAL_ERROR,
    INVALID_HANDOFF,
    INVALID_PARAMS,
    LEASE_NOT_HELD,
    UNKNOWN_HANDOFF,
    Request,
    RpcError,
    param_int,
    param_number,
    param_str,
    rfc3339,
)
from orchestrator.protocol.records import LeaseRecord, NeedsInput, Progress, Report
from orchestrator.protocol.warnings import LEASE_WARNING, lease_warning
from orchestrator.store.sqlite import (
    DuplicateHandoff,
    InvalidSubmission,
    InvalidTransition,
    LeaseNotHeld,
    NewHandoff,
    NothingAsked,
    Store,
    StoreFull,
    UnknownHandoff,
)
from orchestrator.store.states import MERGE_QUEUE_STATES, STATES, State

log = logs.get("handlers")

Handler = Callable[[Session, dict[str, Any]], Awaitable[Any]]


class Handlers:
    """One coroutine per protocol method; the daemon's state lives in its parts."""

    def __init__(
        self,
        config: Config,
        store: Store,
        workspace: Workspace,
        offload: Offload,
        leases: LeaseManager,
        merges: MergeQueue,
        sessions: Callable[[], list[Session]],
        on_change: Callable[[], None],
        warnings: EarlyWarnings | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.clock = clock
        self.store = store
        self.workspace = workspace
        self.offload = offload
        self.leases = leases
        self.merges = merges
        self.sessions = sessions
        self.on_change = on_change
        self.warnings = warnings
        self.table: dict[str, Handler] = {
            "lease.acquire": self.lease_acquire,
            "lease.heartbeat": self.lease_heartbeat,
            "lease.release": self.lease_release,
            "lease.ask": self.lease_ask,
            "handoff.report": self.handoff_report,
            "handoff.submit": self.handoff_submit,
            "handoff.list": self.handoff_list,
            "handoff.get": self.handoff_get,
            "handoff.cancel": self.handoff_cancel,
            "handoff.retry": self.handoff_retry,
            "status": self.status,
            "handoff.answer": self.handoff_answer,
        }

    def reconfigure(self, new: Config) -> None:
        """A reloaded config: the next request sees it."""
        self.config = new

    async def dispatch(self, session: Session, request: Request) -> Any:
        try:
            return await self.table[request.method](session, request.params)
        except LeaseNotHeld as exc:
            raise RpcError(LEASE_NOT_HELD, str(exc)) from exc
        except UnknownHandoff as exc:
            raise RpcError(UNKNOWN_HANDOFF, str(exc)) from exc
        except DuplicateHandoff as exc:
            raise RpcError(DUPLICATE_HANDOFF, str(exc), {"names": exc.names}) from exc
        except InvalidSubmission as exc:
            raise RpcError(
                INVALID_HANDOFF, f"invalid handoff: {exc}", {"errors": exc.problems}
            ) from exc
        except InvalidTransition as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from exc
        except NothingAsked as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from exc
        except StoreFull as exc:
            # No protocol code of its own: an internal error, with a reason to match on.
            # (A store locked by another process is a StoreFull too: reason "store_locked".)
            raise RpcError(INTERNAL_ERROR, str(exc), {"reason": exc.reason}) from exc

    # ---- worker methods ---------------------------------------------------------------

    async def lease_acquire(self, session: Session, params: dict[str, Any]) -> Any:
        wait_s = param_number(params, "waitS", 0.0, 0.0, 300.0)
        return {"lease": await self.leases.acquire(session, wait_s)}

    async def lease_heartbeat(self, session: Session, params: dict[str, Any]) -> Any:
        lease_id = param_str(params, "leaseId")
        token = param_int(params, "token")
        progress = params.get("progress")
        if progress is not None:
            progress = _progress(progress)
        head = params.get("head")
        if head is not None and not (isinstance(head, str) and HEAD_PATTERN.fullmatch(head)):
            raise RpcError(
                INVALID_PARAMS, 'invalid params: "head" must be the branch tip\'s full sha'
            )
        renewal = await self.leases.heartbeat(session, lease_id, token, progress=progress)
        if head is not None and self.warnings is not None:

            async def send(warning: ConflictWarning) -> None:
                await session.notify(
                    LEASE_WARNING, lease_warning(warning.lease_id, warning.paths, warning.against)
                )

            self.warnings.note(lease_id, token, head, send)
        result: dict[str, Any] = {"expiresAt": rfc3339(renewal.expires_at)}
        if renewal.answer is not None:
            result["answer"] = renewal.answer
        return result

    async def lease_ask(self, session: Session, params: dict[str, Any]) -> Any:
        lease_id = param_str(params, "leaseId")
        token = param_int(params, "token")
        question = question_from_wire(params)
        name = await self.leases.ask(session, lease_id, token, question)
        log.info("question_asked", handoff=name, lease=lease_id, choices=question.choices)
        self.on_change()
        return {}

    async def lease_release(self, session: Session, params: dict[str, Any]) -> Any:
        lease_id = param_str(params, "leaseId")
        token = param_int(params, "token")
        reason = params.get("reason") or ""
        if not isinstance(reason, str):
            raise RpcError(INVALID_PARAMS, 'invalid params: "reason" must be a string')
        await self.leases.release(session, lease_id, token, reason=reason)
        self.on_change()
        return {}

    async def handoff_report(self, session: Session, params: dict[str, Any]) -> Any:
        lease_id = param_str(params, "leaseId")
        token = param_int(params, "token")
        try:
            report = Report.from_wire(params.get("report"))
        except ValueError as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from exc
        state = await self.leases.report(session, lease_id, token, report, report.head)
        if state is None:
            return {"accepted": True}  # a retry after a lost reply
        self.merges.wake()
        self.on_change()
        return {"accepted": True}

    # ---- control methods --------------------------------------------------------------

    async def handoff_submit(self, session: Session, params: dict[str, Any]) -> Any:
        documents = params.get("markdown")
        objects = params.get("handoffs")
        if (documents is None) == (objects is None):
            raise RpcError(
                INVALID_PARAMS, 'invalid params: give exactly one of "markdown" or "handoffs"'
            )
        items = documents if documents is not None else objects
        if not isinstance(items, list) or not items:
            raise RpcError(INVALID_PARAMS, "invalid params: a non-empty list is required")
        problems: list[dict[str, Any]] = []
        parsed: list[NewHandoff] = []
        for index, item in enumerate(items):
            try:
                if documents is not None:
                    if not isinstance(item, str):
                        raise handoff_model.HandoffError(
                            [handoff_model.Problem(0, "each markdown entry must be a string")]
                        )
                    model = handoff_model.parse(item)
                    body = item
                else:
                    model = _from_object(item)
                    body = handoff_model.render(model)
            except handoff_model.HandoffError as exc:
                for problem in exc.problems:
                    problems.append(
                        {"document": index, "line": problem.line, "message": problem.message}
                    )
                continue
            parsed.append(
                NewHandoff(
                    name=model.name,
                    title=model.title,
                    priority=model.priority.value,
                    dependencies=model.dependencies,
                    labels=model.labels,
                    body=body,
                    wire=handoff_model.to_wire(model, body),
                )
            )
        if problems:
            summary = "; ".join(
                f"document {p['document']} line {p['line']}: {p['message']}" for p in problems[:5]
            )
            raise RpcError(INVALID_HANDOFF, f"invalid handoff: {summary}", {"errors": problems})
        names = await self.offload.db(
            self.store.submit, parsed, max_attempts=self.config.max_attempts, now=self.clock.now()
        )
        log.info("handoffs_submitted", names=names)
        self.on_change()
        return {"names": names}

    async def handoff_list(self, session: Session, params: dict[str, Any]) -> Any:
        state = params.get("state")
        if state is not None and state not in STATES:
            raise RpcError(
                INVALID_PARAMS,
                f'invalid params: "state" must be null or one of {", ".join(STATES)}',
            )
        found = await self.offload.db(self.store.summaries, None if state is None else State(state))
        return {"handoffs": [h.to_wire() for h in found]}

    async def handoff_get(self, session: Session, params: dict[str, Any]) -> Any:
        name = param_str(params, "name")
        record = await self.offload.db(self.store.detail, name)
        if name in self.merges.current and self.merges.blocked_reason:
            record = dataclasses.replace(record, detail=self.merges.blocked_reason)
        if record.state in MERGE_QUEUE_STATES:
            queue = await self.offload.db(self.store.merge_queue)
            eta = (await self.merges.landing_etas(queue)).get(name)
            record = dataclasses.replace(record, eta_s=eta)
        return record.to_wire()

    async def handoff_cancel(self, session: Session, params: dict[str, Any]) -> Any:
        name = param_str(params, "name")
        lease_id = await self.offload.db(self.store.cancel, name, now=self.clock.now())
        if lease_id is not None:
            await self.leases.cancelled(lease_id)
        log.info("handoff_cancelled", handoff=name, revoked_lease=lease_id)
        self.on_change()
        return {}

    async def handoff_retry(self, session: Session, params: dict[str, Any]) -> Any:
        name = param_str(params, "name")
        state = await self.offload.db(
            self.store.retry, name, max_attempts=self.config.max_attempts, now=self.clock.now()
        )
        log.info("handoff_retried", handoff=name, new_state=state)
        self.on_change()
        return {}

    async def handoff_answer(self, session: Session, params: dict[str, Any]) -> Any:
        name = param_str(params, "name")
        answer = answer_from_wire(params)
        lease_id = await self.offload.db(self.store.answer, name, answer, now=self.clock.now())
        log.info("question_answered", handoff=name, lease=lease_id)
        if await self.leases.notify_answer(lease_id, answered_to_wire(lease_id, answer)):
            await self.offload.db(self.store.mark_answer_delivered, lease_id, now=self.clock.now())
        self.on_change()
        return {}

    async def status(self, session: Session, params: dict[str, Any]) -> Any:
        return await self.status_result()

    async def status_result(self) -> dict[str, Any]:
        """The ``status`` result; the live page shows the same (``observe.page``)."""
        now = self.clock.now()

        def read() -> tuple[dict[str, int], list[LeaseRecord], list[str], dict[str, OpenQuestion]]:
            return (
                self.store.counts(),
                self.store.active_leases(now=now),
                self.store.merge_queue(),
                self.store.open_questions(),
            )

        counts, leases, queue, asked = await self.offload.db(read)
        by_lease = {q.lease_id: q for q in asked.values()}
        tip = await self.offload.git(self.workspace.integration_tip)
        etas = await self.merges.landing_etas(queue) if queue else {}
        workers = [
            {
                "sessionId": s.id,
                "name": s.worker_name,
                "labels": list(s.labels),
                "pid": s.pid,
                "connectedAt": rfc3339(s.connected_at),
            }
            for s in self.sessions()
            if s.role == "worker"
        ]
        return {
            "counts": counts,
            "workers": workers,
            "leases": [
                lease.to_status_wire(NeedsInput.asked(by_lease.get(lease.id))) for lease in leases
            ],
            "needsInput": len(asked),
            "mergeQueue": queue,
            "mergeQueueEtaS": etas,
            "mergeBlocked": self.merges.blocked_reason,
            # How gates are confined (null until the merge queue has probed, at start-up).
            "gateIsolation": None
            if self.merges.isolation is None
            else {
                "mode": self.merges.isolation.mode,
                "namespaces": self.merges.isolation.namespaces,
                "detail": self.merges.isolation.detail,
            },
            "integrationBranch": self.config.integration_branch,
            "integrationTip": tip,
            # Moves of the integration branch the merge queue did not make (null: none seen).
            "integrationMovedOutside": None
            if self.merges.moved_outside is None
            else {
                "count": self.merges.moved_outside.count,
                "from": self.merges.moved_outside.old,
                "to": self.merges.moved_outside.new,
                "at": rfc3339(self.merges.moved_outside.at),
            },
        }


def _progress(value: Any) -> Progress:
    if not isinstance(value, dict):
        raise RpcError(INVALID_PARAMS, 'invalid params: "progress" must be an object')
    percent = value.get("percent")
    if percent is not None and (
        isinstance(percent, bool)
        or not isinstance(percent, (int, float))
        or not 0 <= percent <= 100
    ):
        raise RpcError(INVALID_PARAMS, 'invalid params: "progress.percent" must be 0-100')
    for key in ("phase", "message"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise RpcError(INVALID_PARAMS, f'invalid params: "progress.{key}" must be a string')
    return Progress(
        percent=percent,
        phase=value.get("phase"),
        message=(value.get("message") or "")[:2000] or None,
    )


def _from_object(item: Any) -> handoff_model.Handoff:
    """A structured handoff (the wire shape) as a model; problems as a HandoffError."""
    problem = handoff_model.Problem
    if not isinstance(item, dict):
        raise handoff_model.HandoffError([problem(0, "each handoff must be an object")])
    errors = []
    name = item.get("name")
    if not isinstance(name, str):
        errors.append(problem(0, '"name" is required and must be a string'))
        name = ""
    else:
        try:
            handoff_model.validate_name(name)
        except handoff_model.InvalidNameError as exc:
            errors.append(problem(0, str(exc)))
    priority_text = str(item.get("priority", "MEDIUM")).upper()
    try:
        priority = handoff_model.Priority(priority_text)
    except ValueError:
        errors.append(problem(0, f'priority "{priority_text}" is not one of HIGH, MEDIUM, LOW'))
        priority = handoff_model.Priority.MEDIUM

    def strings(key: str) -> tuple[str, ...]:
        value = item.get(key) or []
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            errors.append(problem(0, f'"{key}" must be a list of strings'))
            return ()
        return tuple(value)

    phases = []
    for raw in item.get("phases") or []:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            errors.append(problem(0, 'each phase needs a "name" and "objectives"'))
            continue
        objectives = raw.get("objectives") or []
        if not (
            isinstance(objectives, list)
            and objectives
            and all(isinstance(o, str) for o in objectives)
        ):
            errors.append(problem(0, f'phase {raw["name"]!r} needs a non-empty "objectives" list'))
            continue
        phases.append(handoff_model.Phase(raw["name"], tuple(objectives)))
    metrics = []
    for raw in item.get("successMetrics") or []:
        if not isinstance(raw, dict) or not all(
            isinstance(raw.get(k), str) for k in ("name", "criteria")
        ):
            errors.append(problem(0, 'each success metric needs a "name" and "criteria"'))
            continue
        metrics.append(handoff_model.SuccessMetric(raw["name"], raw["criteria"]))
    title = item.get("title") or ""
    if not isinstance(title, str):
        errors.append(problem(0, '"title" must be a string'))
        title = ""
    model = handoff_model.Handoff(
        name=name,
        priority=priority,
        priority_note=title,
        dependencies=strings("dependencies"),
        labels=strings("labels"),
        phases=tuple(phases),
        success_metrics=tuple(metrics),
    )
    if errors:
        raise handoff_model.HandoffError(errors)
    # Round-trip through the template so a structured submission obeys the same rules.
    return handoff_model.parse(handoff_model.render(model))
