"""Signed audit checkpoints outside the database: a consistent rewrite, a cut tail and a wiped
chain are found (each edited behind telemetry's back, on SQLite and PostgreSQL), the log is
tamper-evident, keys rotate, retention stops at a signed checkpoint, dead letters are counted.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc import aio

from services.kit.audit import dead_letter_notice
from services.kit.server import StartupRefused
from services.telemetry.app import build
from services.telemetry.audit import GENESIS, AuditLog, Start, event_hash
from services.telemetry.checkpoints import Checkpoint, Keyring, key_id, verify_log_file
from services.telemetry.database import Database
from services.telemetry.settings import TelemetrySettings
from toolmesh.telemetry.v1 import telemetry_pb2 as G

from .conftest import TelemetryServer
from .helpers import bad_fields, caller, sql
from .test_audit import append, chain_of_five, event, verify

ACME = "tenant = 'acme'"


async def checkpoint(server: TelemetryServer, tenant: str = "acme") -> G.AuditCheckpoint:
    reply = await server.stub.CheckpointAudit(G.CheckpointAuditRequest(caller=caller(tenant)))
    return reply.checkpoint


def log_file(server: TelemetryServer) -> Path:
    settings = server.settings
    return settings.resolved_audit_checkpoint_dir() / f"{settings.resolved_replica_id()}.jsonl"


def entries(server: TelemetryServer) -> list[dict]:
    return [json.loads(line) for line in log_file(server).read_text().splitlines()]


async def rehash_from(server: TelemetryServer, seq: int) -> None:
    """Recompute acme's chain from ``seq`` on and its head, as someone who knows the format
    and can write the database would after editing an event."""
    rows = await sql(
        server,
        "SELECT id, seq, prev_hash, event_id, occurred_at_ns, tenant, actor, action, target, "
        "outcome, request_id, trace_id, policy_version, contract_versions, details_json "
        f"FROM telemetry_audit WHERE {ACME} ORDER BY seq",
    )
    prev = GENESIS
    for row in rows:
        fields = dict(row._mapping)
        if fields["seq"] >= seq:
            digest = event_hash(fields["seq"], prev, fields)
            await sql(
                server,
                "UPDATE telemetry_audit SET prev_hash = :prev, hash = :hash WHERE id = :id",
                prev=prev,
                hash=digest,
                id=fields["id"],
            )
            prev = digest
        else:
            (prev,) = (
                await sql(
                    server, "SELECT hash FROM telemetry_audit WHERE id = :id", id=fields["id"]
                )
            )[0]
    last = rows[-1].seq
    await sql(
        server,
        f"UPDATE telemetry_audit_heads SET seq = :seq, hash = :hash WHERE {ACME}",
        seq=last,
        hash=prev,
    )


async def test_checkpoint_signs_the_head_into_the_log(server: TelemetryServer) -> None:
    chain = await chain_of_five(server)
    signed = await checkpoint(server)
    assert (signed.tenant, signed.seq, signed.hash) == ("acme", 5, chain[-1].hash)
    assert (signed.log, signed.entry) == ("replica-1", 1)
    # Unchanged head: the same checkpoint, nothing appended.
    assert await checkpoint(server) == signed
    assert await checkpoint(server, "nobody") == G.AuditCheckpoint()
    (entry,) = entries(server)
    assert (entry["tenant"], entry["seq"], entry["prev"]) == ("acme", 5, "0" * 64)
    keyring = Keyring.load(None, server.settings.resolved_audit_keyring_dir())
    assert keyring.problem(Checkpoint(**entry)) is None
    assert verify_log_file(log_file(server), keyring) == []
    result = await verify(server)
    assert result.ok and result.last_checkpoint == signed
    await append(server, event("e6"))
    again = await checkpoint(server)
    assert (again.seq, again.entry) == (6, 2)
    assert entries(server)[1]["prev"] != "0" * 64


@pytest.mark.parametrize(
    ("tamper", "kind", "seq"),
    [
        ("rewrite", G.AUDIT_PROBLEM_KIND_REWRITTEN, 5),
        ("truncate", G.AUDIT_PROBLEM_KIND_TRUNCATED, 4),
        ("wipe", G.AUDIT_PROBLEM_KIND_WIPED, 5),
    ],
)
async def test_rewrite_truncation_and_wipe_are_found(
    server: TelemetryServer, tamper: str, kind: int, seq: int
) -> None:
    await chain_of_five(server)
    await checkpoint(server)
    await checkpoint(server, "globex")
    if tamper == "rewrite":
        await sql(server, f"UPDATE telemetry_audit SET outcome = 'denied' WHERE {ACME} AND seq = 3")
        await rehash_from(server, 3)
    elif tamper == "truncate":
        await sql(server, f"DELETE FROM telemetry_audit WHERE {ACME} AND seq > 3")
        await rehash_from(server, 4)
    else:
        await sql(server, f"DELETE FROM telemetry_audit WHERE {ACME}")
        await sql(server, f"DELETE FROM telemetry_audit_heads WHERE {ACME}")
    result = await verify(server)
    assert not result.ok
    assert (result.problem.kind, result.problem.seq) == (kind, seq), result.problem.message
    assert result.last_checkpoint.seq == 5
    assert (await verify(server, "globex")).ok
    # Nothing signs the damage: the next checkpoint refuses the chain.
    if tamper != "wipe":
        with pytest.raises(aio.AioRpcError) as caught:
            await checkpoint(server)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_chain_edited_before_any_checkpoint_is_never_signed(
    server: TelemetryServer,
) -> None:
    await chain_of_five(server)
    await sql(server, f"UPDATE telemetry_audit SET actor = 'mallory' WHERE {ACME} AND seq = 2")
    with pytest.raises(aio.AioRpcError) as caught:
        await checkpoint(server)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "seq 2" in (caught.value.details() or "")
    assert not log_file(server).read_text()


@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
async def test_a_forged_or_edited_log_is_invalid(
    server: TelemetryServer, settings: TelemetrySettings
) -> None:
    await chain_of_five(server)
    await checkpoint(server)
    # Another "replica" log signed with a key nobody trusts, claiming a longer chain.
    stranger = Ed25519PrivateKey.generate()
    forged = Checkpoint(
        log="evil",
        entry=1,
        prev="0" * 64,
        tenant="acme",
        seq=99,
        hash="f" * 64,
        time_ns=time.time_ns(),
        key_id=key_id(stranger.public_key()),
    )
    signed = Keyring(stranger, {}).sign(forged.signed_bytes())
    evil = log_file(server).with_name("evil.jsonl")
    evil.write_bytes(Checkpoint(**{**forged.__dict__, "signature": signed}).line() + b"\n")
    result = await verify(server)
    assert result.problem.kind == G.AUDIT_PROBLEM_KIND_CHECKPOINT_INVALID
    assert "not in the keyring" in result.problem.message
    # A log that disappears is as suspicious as one that shrinks.
    evil.unlink()
    result = await verify(server)
    assert "evil.jsonl: the file was removed" in result.problem.message

    # Editing the last entry of our own log (say, to lower the checkpointed seq) voids its
    # signature; editing or removing an earlier one also breaks the log's own chain. Both are
    # found when the log is read from the start: at start-up, or by verify_log_file on an
    # off-box copy.
    await append(server, event("e6"))
    await checkpoint(server)
    await server.stop()
    own = log_file(server)
    first, last = own.read_text().splitlines(keepends=True)
    own.write_text(first + last.replace('"seq":6', '"seq":3'))
    keyring = Keyring.load(None, settings.resolved_audit_keyring_dir())
    (problem,) = verify_log_file(own, keyring)
    assert "signature does not verify" in problem
    # The same check for an operator's off-box copy, from the command line.
    keyring_dir = str(settings.resolved_audit_keyring_dir())
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.telemetry",
            "verify-checkpoints",
            "--keyring",
            keyring_dir,
            str(own),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (checked.returncode, checked.stdout.strip()) == (1, problem)
    restarted = await TelemetryServer(settings).start()
    try:
        result = await verify(restarted)
        assert result.problem.kind == G.AUDIT_PROBLEM_KIND_CHECKPOINT_INVALID
        assert "signature does not verify" in result.problem.message
    finally:
        await restarted.stop()
    own.write_text(last)
    assert "does not link to the entry before it" in verify_log_file(own, keyring)[0]
    with pytest.raises(StartupRefused, match="does not link to the entry before it"):
        await TelemetryServer(settings).start()


async def test_keys_rotate_and_old_checkpoints_still_verify(tmp_path: Path) -> None:
    first = await TelemetryServer(TelemetrySettings(port=0, data_dir=tmp_path)).start()
    await chain_of_five(first)
    old = await checkpoint(first)
    await first.stop()

    new_key = tmp_path / "new-audit-key.pem"
    new_key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    new_key.chmod(0o600)
    # The keyring (the dev default) still holds the first key's public half.
    rotated = TelemetrySettings(port=0, data_dir=tmp_path, audit_key_file=new_key)
    second = await TelemetryServer(rotated).start()
    try:
        result = await verify(second)
        assert result.ok and result.last_checkpoint.key_id == old.key_id
        await append(second, event("e6"))
        fresh = await checkpoint(second)
        assert fresh.key_id != old.key_id and fresh.seq == 6
    finally:
        await second.stop()

    # Without the old key in the keyring the old checkpoint cannot be trusted.
    for pem in rotated.resolved_audit_keyring_dir().glob("*.pem"):
        pem.unlink()
    third = await TelemetryServer(rotated).start()
    try:
        result = await verify(third)
        assert result.problem.kind == G.AUDIT_PROBLEM_KIND_CHECKPOINT_INVALID
        assert old.key_id in result.problem.message
    finally:
        await third.stop()


def test_production_signs_only_with_a_configured_private_key(tmp_path: Path) -> None:
    production = {"env": "production", "data_dir": tmp_path, "port": 0}
    with pytest.raises(StartupRefused, match="AUDIT_KEY_FILE"):
        build(TelemetrySettings(**production), [])
    key = tmp_path / "audit.pem"
    key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o644)
    settings = TelemetrySettings(
        **production, audit_key_file=key, audit_checkpoint_dir=tmp_path / "checkpoints"
    )
    with pytest.raises(StartupRefused, match="readable by others"):
        build(settings, [])
    key.chmod(0o600)
    with pytest.raises(StartupRefused, match="AUDIT_CHECKPOINT_DIR"):
        build(TelemetrySettings(**production, audit_key_file=key), [])
    assert callable(build(settings, []))
    assert not (tmp_path / "audit-signing-key.pem").exists()


def test_development_creates_a_private_key(tmp_path: Path) -> None:
    build(TelemetrySettings(port=0, data_dir=tmp_path), [])
    key = tmp_path / "audit-signing-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    (public,) = (tmp_path / "audit-keyring").glob("*.pem")
    keyring = Keyring.load(key, None)
    assert public.name == f"{keyring.signing_key_id}.pem"


async def test_heads_are_checkpointed_periodically(tmp_path: Path) -> None:
    settings = TelemetrySettings(port=0, data_dir=tmp_path, audit_checkpoint_interval_s=0.05)
    server = await TelemetryServer(settings).start()
    try:
        await chain_of_five(server)
        deadline = time.monotonic() + 10
        while {(e["tenant"], e["seq"]) for e in entries(server)} != {("acme", 5), ("globex", 1)}:
            assert time.monotonic() < deadline, entries(server)
            await asyncio.sleep(0.05)
        assert (await verify(server)).last_checkpoint.seq == 5
    finally:
        await server.stop()


async def test_retention_prunes_only_up_to_a_signed_checkpoint(tmp_path: Path) -> None:
    settings = TelemetrySettings(
        port=0, data_dir=tmp_path, audit_retention_days=0.5 / 86400, prune_interval_s=0.05
    )
    server = await TelemetryServer(settings).start()
    try:
        await append(server, *(event(f"e{i}") for i in range(1, 4)))
        anchor = await checkpoint(server)
        await append(server, event("e4"), event("e5"))
        await checkpoint(server)
        deadline = time.monotonic() + 10
        while (result := await verify(server)).pruned_through_seq != 3:
            assert time.monotonic() < deadline, result
            await asyncio.sleep(0.05)
        assert (result.ok, result.events_checked, result.head_seq) == (True, 2, 5)
        listed = await server.stub.ListAudit(G.ListAuditRequest(caller=caller()))
        assert [e.seq for e in listed.events] == [4, 5]
        # Seq 4 and 5 stay: no checkpoint of them is old enough... until one is.
        (marker,) = await sql(
            server, f"SELECT pruned_seq, pruned_hash FROM telemetry_audit_heads WHERE {ACME}"
        )
        assert tuple(marker) == (3, anchor.hash)
    finally:
        await server.stop()

    # Someone deleting more and moving the marker cannot forge the checkpoint it needs.
    await sql(server, f"DELETE FROM telemetry_audit WHERE {ACME} AND seq = 4")
    await sql(server, f"UPDATE telemetry_audit_heads SET pruned_seq = 4 WHERE {ACME}")
    kept = await TelemetryServer(settings.model_copy(update={"audit_retention_days": 0})).start()
    try:
        problem = (await verify(kept)).problem
        assert problem.kind == G.AUDIT_PROBLEM_KIND_CHECKPOINT_INVALID
    finally:
        await kept.stop()


async def test_dead_letter_notices_are_counted_and_unknown_actions_refused(
    server: TelemetryServer,
) -> None:
    refused = event("bad-1")
    notice = dead_letter_notice(refused, "telemetry refused it: events[0].target too long")
    await append(server, event("e1"), notice, notice)
    result = await verify(server)
    assert (result.ok, result.events_checked, result.dead_letter_notices) == (True, 2, 1)
    with pytest.raises(aio.AioRpcError) as caught:
        await append(server, event("e2"), event("e3", action="release"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == ["events[1].action"]


async def test_events_appended_while_a_head_is_signed_are_not_tampering(
    server: TelemetryServer,
) -> None:
    """The periodic checkpoint reads the heads, then the events: an append in between belongs
    to the next checkpoint, it must not make this one refuse the chain."""
    await chain_of_five(server)
    database = Database(server.settings.resolved_database_url())
    try:
        audit = AuditLog(database)
        head = await audit.head("acme")
        assert head is not None
        await append(server, event("e6"))
        assert await audit.verify_since(head, Start()) is None
    finally:
        await database.close()
