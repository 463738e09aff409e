"""Signed checkpoints of the audit chains, kept outside the database in an append-only log.

Someone who can write the database can rewrite a tenant's chain and recompute every hash, cut
its tail or wipe it, and the chain alone still verifies. So now and then (and on demand) each
tenant's chain head (seq, hash) is signed with an Ed25519 key that is not in the database and
appended to a checkpoint log on another volume. A chain that disagrees with its newest
checkpoint was rewritten, ends before it (truncated) or is gone (wiped).

The log is transparency-log style: JSON lines, one file per telemetry replica
(``<replica>.jsonl``), each entry carrying the SHA-256 of the entry before it, so an edited,
removed or reordered entry breaks the file's own chain. Files of every replica found in the
directory are read (a shared volume gives every replica every log; per-replica volumes each
their own, which is complete since every replica checkpoints every tenant). Entries are
verified as they are read; only the newest checkpoint per tenant is kept in memory.

Keys: the signing key's id is the first 32 hex characters of the SHA-256 of its raw public key.
A keyring directory of PEM public keys verifies checkpoints signed by earlier keys, so a key
can be rotated without making old checkpoints unverifiable (docs/security.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

GENESIS = "0" * 64
VERSION = 1
SUFFIX = ".jsonl"


class CheckpointSetupError(ValueError):
    """A key is missing, unreadable, not Ed25519 or readable by others, or our own log is
    broken: telemetry must not sign (production refuses to start)."""


def canonical(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True)
class Checkpoint:
    """One log entry: a tenant's chain head, signed."""

    log: str
    entry: int
    prev: str
    tenant: str
    seq: int
    hash: str
    time_ns: int
    key_id: str
    signature: str = ""
    v: int = VERSION

    def signed_bytes(self) -> bytes:
        fields = asdict(self)
        del fields["signature"]
        return canonical(fields)

    def line(self) -> bytes:
        return canonical(asdict(self))

    def digest(self) -> str:
        """What the next entry's ``prev`` is."""
        return hashlib.sha256(self.line()).hexdigest()

    @classmethod
    def parse(cls, text: str | bytes) -> Checkpoint:
        """An entry from its JSON line; ValueError when it is not one."""
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) != set(cls.__dataclass_fields__):
            raise ValueError("not a checkpoint entry")
        checkpoint = cls(**data)
        types = (
            (checkpoint.log, str),
            (checkpoint.prev, str),
            (checkpoint.tenant, str),
            (checkpoint.hash, str),
            (checkpoint.key_id, str),
            (checkpoint.signature, str),
        )
        numbers = (checkpoint.entry, checkpoint.seq, checkpoint.time_ns, checkpoint.v)
        if not all(isinstance(value, kind) for value, kind in types) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in numbers
        ):
            raise ValueError("checkpoint entry fields have the wrong types")
        return checkpoint


class Keyring:
    """The signing key (absent in a verifier) and every public key checkpoints may name."""

    def __init__(
        self, signing: Ed25519PrivateKey | None, public: dict[str, Ed25519PublicKey]
    ) -> None:
        self._signing = signing
        self.signing_key_id = key_id(signing.public_key()) if signing else ""
        self._public = dict(public)
        if signing is not None:
            self._public[self.signing_key_id] = signing.public_key()

    @classmethod
    def load(cls, key_file: Path | None, keyring_dir: Path | None) -> Keyring:
        signing = load_private_key(key_file) if key_file else None
        public: dict[str, Ed25519PublicKey] = {}
        if keyring_dir is not None and keyring_dir.is_dir():
            for path in sorted(keyring_dir.glob("*.pem")):
                key = _load_public_key(path)
                public[key_id(key)] = key
        return cls(signing, public)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._public)

    def sign(self, payload: bytes) -> str:
        if self._signing is None:
            raise RuntimeError("this keyring has no signing key")
        return base64.b64encode(self._signing.sign(payload)).decode()

    def problem(self, checkpoint: Checkpoint) -> str | None:
        """Why the checkpoint's signature does not verify, or None when it does."""
        key = self._public.get(checkpoint.key_id)
        if key is None:
            return f"signed by key {checkpoint.key_id}, which is not in the keyring"
        try:
            key.verify(
                base64.b64decode(checkpoint.signature, validate=True), checkpoint.signed_bytes()
            )
        except (InvalidSignature, binascii.Error, ValueError):
            return f"its signature does not verify with key {checkpoint.key_id}"
        return None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 signing key at ``path``, which only its owner may read."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointSetupError(
            f"cannot read the audit signing key {path}: {error.strerror}"
        ) from None
    if mode & 0o077:
        raise CheckpointSetupError(
            f"the audit signing key {path} is readable by others; chmod 600 it"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CheckpointSetupError(
            f"the audit signing key {path} is not an unencrypted PEM key"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CheckpointSetupError(f"the audit signing key {path} is not an Ed25519 key")
    return key


def _load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as error:
        raise CheckpointSetupError(
            f"audit keyring: {path} is not a PEM public key ({error})"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise CheckpointSetupError(f"audit keyring: {path} is not an Ed25519 public key")
    return key


def create_dev_key(key_file: Path, keyring_dir: Path) -> None:
    """Development only: a fresh signing key (0600) and its public key in the keyring, so
    checkpoints stay verifiable if the key file is later replaced.

    Replicas sharing a data directory may start at once: the key appears whole or not at all
    (written aside, then linked into place), its public key is in the keyring before it does,
    and a replica that loses the race keeps the winner's key."""
    key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyring_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key()
    public_file = keyring_dir / f"{key_id(public)}.pem"
    public_file.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    aside = key_file.with_name(f".{key_file.name}.{os.getpid()}.tmp")
    descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    try:
        os.link(aside, key_file)
    except FileExistsError:
        public_file.unlink(missing_ok=True)  # another replica's key is the one in use
    finally:
        aside.unlink(missing_ok=True)


@dataclass
class _FileState:
    offset: int = 0
    last_digest: str = GENESIS
    entries: int = 0
    broken: str = ""


@dataclass
class LogState:
    """What the logs read so far say."""

    latest: dict[str, Checkpoint] = field(default_factory=dict)
    # Tenant -> why one of its entries does not verify.
    invalid: dict[str, str] = field(default_factory=dict)
    # File name -> why the file's own chain is broken (every tenant is affected).
    broken: dict[str, str] = field(default_factory=dict)


class CheckpointLog:
    """This replica's append-only log, and every log found beside it, read incrementally."""

    def __init__(self, directory: Path, replica: str, keyring: Keyring) -> None:
        self.directory = directory
        self.replica = replica
        self.keyring = keyring
        self.path = directory / f"{replica}{SUFFIX}"
        self.state = LogState()
        self._files: dict[Path, _FileState] = {}
        self._own_latest: dict[str, Checkpoint] = {}
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        """Create the directory, mend a torn last line of our own file, read every log."""
        await asyncio.to_thread(self._open)
        await self.refresh()
        own = self._files.get(self.path)
        if own is not None and own.broken:
            raise CheckpointSetupError(
                f"the audit checkpoint log {self.path} is broken ({own.broken}); keep it as "
                "evidence (move it aside) and start again"
            )

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(descriptor)
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # A write torn by a crash: the entry was never acknowledged, drop it.
            log.warning(
                "checkpoint log ends in a partial entry; removing it",
                extra={"path": str(self.path), "bytes": len(data) - end},
            )
            with self.path.open("r+b") as file:
                file.truncate(end)
                os.fsync(file.fileno())

    async def refresh(self) -> LogState:
        """Read what was appended to every log since the last call (cheap when nothing was)."""
        async with self._lock:
            await asyncio.to_thread(self._refresh)
        return self.state

    def _refresh(self) -> None:
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            state = self._files.setdefault(path, _FileState())
            if state.broken:
                continue
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                self._break(path, state, "the file was removed")
                continue
            if size < state.offset:
                self._break(path, state, "the file shrank: entries were removed")
                continue
            if size == state.offset:
                continue
            with path.open("rb") as file:
                file.seek(state.offset)
                chunk = file.read(size - state.offset)
            complete = chunk[: chunk.rfind(b"\n") + 1]
            for raw in complete.splitlines():
                self._read_entry(path, state, raw)
                if state.broken:
                    break
            state.offset += len(complete)
        for path, state in self._files.items():
            if not state.broken and not path.exists():
                self._break(path, state, "the file was removed")

    def _read_entry(self, path: Path, state: _FileState, raw: bytes) -> None:
        where = f"entry {state.entries + 1}"
        try:
            checkpoint = Checkpoint.parse(raw)
        except ValueError:
            self._break(path, state, f"{where} is not a checkpoint entry")
            return
        if checkpoint.line() != raw:
            problem = f"{where} is not in canonical form"
        elif checkpoint.entry != state.entries + 1 or checkpoint.prev != state.last_digest:
            problem = f"{where} does not link to the entry before it"
        elif checkpoint.log != path.name.removesuffix(SUFFIX):
            problem = f"{where} belongs to log {checkpoint.log}"
        else:
            problem = ""
        if problem:
            self._break(path, state, problem)
            return
        state.entries += 1
        state.last_digest = checkpoint.digest()
        bad_signature = self.keyring.problem(checkpoint)
        if bad_signature:
            where = f"checkpoint {path.name}#{checkpoint.entry} of seq {checkpoint.seq}"
            self.state.invalid[checkpoint.tenant] = f"{where}: {bad_signature}"
            return
        self._remember(checkpoint, path == self.path)

    def _remember(self, checkpoint: Checkpoint, own: bool) -> None:
        latest = self.state.latest.get(checkpoint.tenant)
        if latest is None or (checkpoint.seq, checkpoint.time_ns) > (latest.seq, latest.time_ns):
            self.state.latest[checkpoint.tenant] = checkpoint
        if own:
            self._own_latest[checkpoint.tenant] = checkpoint

    def _break(self, path: Path, state: _FileState, why: str) -> None:
        state.broken = why
        self.state.broken[path.name] = why
        log.error("audit checkpoint log is broken", extra={"path": str(path), "problem": why})

    def own_latest(self, tenant: str) -> Checkpoint | None:
        return self._own_latest.get(tenant)

    async def append(self, heads: list[tuple[str, int, str]]) -> list[Checkpoint]:
        """Sign and append (tenant, seq, hash) heads; one fsync for the lot."""
        if not heads:
            return []
        async with self._lock:
            return await asyncio.to_thread(self._append, heads)

    def _append(self, heads: list[tuple[str, int, str]]) -> list[Checkpoint]:
        own = self._files.setdefault(self.path, _FileState())
        with self.path.open("ab") as file:
            # An exclusive lock, and whatever another writer of this file appended read first,
            # so two processes given the same replica id still extend one unbroken chain.
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            try:
                self._refresh()
                if own.broken:
                    raise CheckpointSetupError(
                        f"the audit checkpoint log {self.path} is broken ({own.broken})"
                    )
                entries, prev, now = [], own.last_digest, time.time_ns()
                for number, (tenant, seq, digest) in enumerate(heads, start=own.entries + 1):
                    unsigned = Checkpoint(
                        log=self.replica,
                        entry=number,
                        prev=prev,
                        tenant=tenant,
                        seq=seq,
                        hash=digest,
                        time_ns=now,
                        key_id=self.keyring.signing_key_id,
                    )
                    signed = replace(unsigned, signature=self.keyring.sign(unsigned.signed_bytes()))
                    entries.append(signed)
                    prev = signed.digest()
                data = b"".join(entry.line() + b"\n" for entry in entries)
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            finally:
                fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        own.offset += len(data)
        own.entries += len(entries)
        own.last_digest = prev
        for entry in entries:
            self._remember(entry, own=True)
        return entries


def verify_log_file(path: Path, keyring: Keyring) -> list[str]:
    """Every problem of one log file, read from scratch (say, an off-box copy)."""
    checker = CheckpointLog(path.parent, path.name.removesuffix(SUFFIX), keyring)
    state = checker._files.setdefault(path, _FileState())
    for raw in path.read_bytes().splitlines():
        checker._read_entry(path, state, raw)
        if state.broken:
            break
    problems = [f"{name}: {why}" for name, why in checker.state.broken.items()]
    return problems + list(checker.state.invalid.values())
