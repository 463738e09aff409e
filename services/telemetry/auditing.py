"""The audit trail's checkpoints and retention: when to sign, what VerifyAudit trusts.

A head is signed only after the events since the previous checkpoint were checked, so a
checkpoint never vouches for a chain that was already tampered with; a refusal is logged as an
error and counted, and VerifyAudit reports the problem itself.
"""

from __future__ import annotations

import logging
import time

from services.kit.metrics import meter
from services.telemetry.audit import AuditLog, CheckpointTrust, Head, Problem, Start
from services.telemetry.checkpoints import Checkpoint, CheckpointLog

log = logging.getLogger(__name__)

_CHECKPOINTS = meter().create_counter(
    "toolmesh.telemetry.audit_checkpoints",
    unit="{checkpoint}",
    description="Signed audit checkpoints appended to this replica's log",
)
_REFUSED = meter().create_counter(
    "toolmesh.telemetry.audit_checkpoints_refused",
    unit="{checkpoint}",
    description="Chain heads not signed because the chain since the last checkpoint is broken",
)


class ChainBroken(Exception):
    """The events since the last checkpoint do not verify: nothing was signed."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class AuditCheckpoints:
    def __init__(self, audit: AuditLog, checkpoint_log: CheckpointLog, retention_s: float) -> None:
        self._audit = audit
        self._log = checkpoint_log
        self._retention_ns = int(retention_s * 1e9)

    async def checkpoint(self, tenant: str) -> Checkpoint | None:
        """Sign the tenant's head now (None: no event yet). An unchanged head returns the
        checkpoint that signed it."""
        head = await self._audit.head(tenant)
        if head is None or head.seq == 0:
            return None
        signed, problems = await self._sign([head])
        if problems:
            raise ChainBroken(problems[0])
        return signed.get(tenant) or self._log.own_latest(tenant)

    async def checkpoint_all(self) -> int:
        """Sign every head that moved since this log's last checkpoint of it (periodic)."""
        signed, _ = await self._sign(await self._audit.heads())
        return len(signed)

    async def _sign(self, heads: list[Head]) -> tuple[dict[str, Checkpoint], list[Problem]]:
        await self._log.refresh()
        due: list[Head] = []
        problems: list[Problem] = []
        for head in heads:
            previous = self._log.own_latest(head.tenant)
            if head.seq == 0 or (
                previous and (previous.seq, previous.hash) == (head.seq, head.hash)
            ):
                continue
            since = Start(previous.seq, previous.hash) if previous else Start()
            problem = await self._audit.verify_since(head, since)
            if problem is not None:
                _REFUSED.add(1)
                log.error(
                    "audit head not checkpointed: the chain since the last checkpoint is broken",
                    extra={"tenant": head.tenant, "seq": problem.seq, "problem": problem.message},
                )
                problems.append(problem)
                continue
            due.append(head)
        entries = await self._log.append([(h.tenant, h.seq, h.hash) for h in due])
        _CHECKPOINTS.add(len(entries))
        for entry in entries:
            await self._audit.record_anchor(entry)
        return {entry.tenant: entry for entry in entries}, problems

    async def trust(self, tenant: str) -> CheckpointTrust:
        """The newest checkpoint of the tenant from every log in reach, or why there is none
        to trust."""
        state = await self._log.refresh()
        problem = None
        if state.broken:
            name, why = sorted(state.broken.items())[0]
            problem = Problem("checkpoint_invalid", 0, "", f"checkpoint log {name}: {why}")
        elif tenant in state.invalid:
            problem = Problem("checkpoint_invalid", 0, "", state.invalid[tenant])
        prunable = time.time_ns() - self._retention_ns if self._retention_ns else 0
        return CheckpointTrust(state.latest.get(tenant), problem, self._log.keyring, prunable)

    async def prune(self) -> int:
        """Retention: events before the newest anchor older than the retention (if any)."""
        if not self._retention_ns:
            return 0
        return await self._audit.prune(self._log.keyring, time.time_ns() - self._retention_ns)
