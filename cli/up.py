"""``toolmesh up``: the five services and the MCP face as child processes on loopback, one
command, one Ctrl-C.

Telemetry starts first (so every later service can export spans from its first call), then the
gateway (so it is only reachable once what it calls is), and the MCP face last, in front of the
gateway. A child that dies is logged and restarted with exponential backoff; SIGINT or SIGTERM
stops them all with SIGTERM, outermost first (the face, then the gateway, then the rest).

`up` reports only what its own children do: before starting, every port must be free (a taken
one is named with the process holding it); a service counts as up when the child `up` started
says it listens on its port (its "serving" log line carries its pid and port) and answers
SERVING there. A child that refuses to start is reported by its one CRITICAL line, and `up`
exits 2 without a traceback. Files it creates (the data directory, logs) are private (0700/0600).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.settings import DEFAULT_METRICS_PORTS, DEFAULT_PORTS

ORDER = ("telemetry", "auth", "memory", "router", "gateway", "mcpface")
# Started wave by wave, each wave's children together: a wave needs only the ones before it
# (telemetry takes everyone's spans and audit events, the gateway waits for auth, the face
# for the gateway), and the children's interpreters start on every core at once.
WAVES = (("telemetry",), ("auth", "memory", "router"), ("gateway",), ("mcpface",))
MODULES = {name: f"services.{name}" for name in ORDER} | {
    "gateway": "gateway",
    "mcpface": "mcpface",
}
# Children whose readiness is an HTTP probe rather than gRPC health.
HTTP_CHILDREN = {"mcpface": "/readyz"}
# Stopped first: whoever calls the others.
OUTERMOST = ("mcpface", "gateway")
TAIL_LINES = 30
LINE_LIMIT = 1 << 20
# Restart backoff: doubles from the first to the cap; a child that ran this long starts over.
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_RUN_S = 60.0
STOP_WAIT_S = 30.0
EXIT_START_FAILED = 2
# Ports below this need privileges an ordinary user lacks.
FIRST_UNPRIVILEGED_PORT = 1024
MAX_PORT = 65535


class StartError(Exception):
    """A service did not come up; the message says which and why."""


def base_port(text: str) -> int:
    """``--base-port``: every derived port (base .. base+5) must be a port this user can bind."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if port == 0:
        return 0
    last = port + len(DEFAULT_PORTS) - 1
    if port < 0 or last > MAX_PORT:
        raise argparse.ArgumentTypeError(
            f"{port} puts the last port (the MCP face's) at {last}; choose a base port from "
            f"{FIRST_UNPRIVILEGED_PORT} to {MAX_PORT - len(DEFAULT_PORTS) + 1}"
        )
    if port < FIRST_UNPRIVILEGED_PORT and os.geteuid() != 0:
        raise argparse.ArgumentTypeError(
            f"ports below {FIRST_UNPRIVILEGED_PORT} need root; choose a base port from "
            f"{FIRST_UNPRIVILEGED_PORT} to {MAX_PORT - len(DEFAULT_PORTS) + 1}"
        )
    return port


def add_parser(sub: Any) -> None:
    up = sub.add_parser("up", help="run the five services and the MCP face locally until Ctrl-C")
    up.add_argument(
        "--base-port",
        type=base_port,
        default=0,
        help="gateway on this port, auth +1, router +2, memory +3, telemetry +4, MCP face +5 "
        "(default: TOOLMESH_<SERVICE>_PORT or 50051-50056)",
    )
    up.add_argument(
        "--logs",
        choices=("stdout", "files"),
        default="stdout",
        help="service logs prefixed on stdout, or in $TOOLMESH_DATA_DIR/logs/<service>.log",
    )
    up.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds each service gets to report SERVING (default 30)",
    )


def child_environment(base: dict[str, str], base_port: int) -> dict[str, str]:
    """The caller's environment; with a base port, every port and target derived from it.

    Without one, each service listens where its ``TOOLMESH_<SERVICE>_PORT`` (or the default)
    says, and the services that call it are pointed there too (the shared
    ``TOOLMESH_<SERVICE>_TARGET``, which a service's own ``TOOLMESH_<CALLER>_<SERVICE>_TARGET``
    still overrides): a moved gateway port must not leave the MCP face calling 50051.
    """
    env = dict(base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if base_port:
        for name, default in DEFAULT_PORTS.items():
            port = base_port + default - DEFAULT_PORTS["gateway"]
            env[f"TOOLMESH_{name.upper()}_PORT"] = str(port)
            env[f"TOOLMESH_{name.upper()}_TARGET"] = f"127.0.0.1:{port}"
            env[f"TOOLMESH_GATEWAY_{name.upper()}_TARGET"] = f"127.0.0.1:{port}"
        env["TOOLMESH_OTLP_ENDPOINT"] = env["TOOLMESH_TELEMETRY_TARGET"]
    else:
        for name in DEFAULT_PORTS:
            env.setdefault(f"TOOLMESH_{name.upper()}_TARGET", address(name, env))
        env.setdefault("TOOLMESH_OTLP_ENDPOINT", env["TOOLMESH_TELEMETRY_TARGET"])
    return env


def address(name: str, env: dict[str, str]) -> str:
    """Where the service will listen, read the way its settings read it."""
    prefix = f"TOOLMESH_{name.upper()}_"
    port = env.get(prefix + "PORT") or str(DEFAULT_PORTS[name])
    host = env.get(prefix + "HOST") or env.get("TOOLMESH_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def ports_of(name: str, env: dict[str, str]) -> dict[str, int]:
    """The ports a service will listen on, by the variable that sets each (0: none or any)."""
    prefix = f"TOOLMESH_{name.upper()}_"
    found: dict[str, int] = {}
    for key, default in (
        ("PORT", DEFAULT_PORTS[name]),
        ("METRICS_PORT", DEFAULT_METRICS_PORTS[name]),
    ):
        text = env.get(prefix + key) or env.get(f"TOOLMESH_{key}") or str(default)
        try:
            found[prefix + key] = int(text)
        except ValueError:
            found[prefix + key] = 0  # the service itself refuses it, naming the variable
    return found


def _listening_inodes(port: int) -> dict[str, int]:
    """Inodes of the TCP sockets listening on ``port`` (any address), with their owner uid."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN.
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes[fields[9]] = int(fields[7])
    return inodes


def _listeners(inodes: dict[str, int]) -> dict[int, str]:
    """Pid -> command line of the processes holding these socket inodes (those /proc shows)."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    found: dict[int, str] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in wanted:
                    command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    found[int(proc.name)] = command.strip() or "?"
                    break
            except OSError:
                continue
    return found


def listener_pids(port: int) -> set[int]:
    """The pids listening on ``port``, as far as /proc shows them."""
    return set(_listeners(_listening_inodes(port)))


def port_holder(port: int) -> str | None:
    """Who listens on ``port``: "pid N (command)" from /proc, or a weaker description; None
    when the port is free."""
    inodes = _listening_inodes(port)
    if not inodes:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As servers bind: connections of earlier runs in TIME_WAIT do not hold the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return "an unknown process (not visible in /proc)"
        return None
    for pid, command in _listeners(inodes).items():
        return f"pid {pid} ({command})"
    uid = next(iter(inodes.values()))
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return f"a process of user {user} (its pid is not visible to this user)"


def check_ports_free(env: dict[str, str]) -> None:
    """Fail before starting anything when a port the mesh needs is taken."""
    for name in ORDER:
        for variable, port in ports_of(name, env).items():
            if not port:
                continue
            holder = port_holder(port)
            if holder is not None:
                raise StartError(
                    f"port {port} ({variable}, {name}) is taken by {holder}; stop it, or "
                    f"choose other ports (--base-port, or {variable})"
                )


@dataclass
class Child:
    name: str
    env: dict[str, str]
    sink: Callable[[str], None]
    proc: asyncio.subprocess.Process | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    pump: asyncio.Task[None] | None = None
    # From the child's own "serving" line: the port it listens on.
    serving_port: int | None = None
    # The child's CRITICAL start-up line, when it refused to start.
    refusal: dict[str, object] | None = None

    @property
    def address(self) -> str:
        return address(self.name, self.env)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    async def spawn(self) -> None:
        self.serving_port = None
        self.refusal = None
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            MODULES[self.name],
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            limit=LINE_LIMIT,
            # Own process group: a terminal's Ctrl-C reaches only `up`, which stops the
            # children in order instead of all of them racing.
            start_new_session=True,
        )
        self.pump = asyncio.create_task(self._pump(self.proc))

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        """Forward output line by line; never stop reading, or the child blocks on a full pipe."""
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line over LINE_LIMIT: asyncio has dropped it
                raw = b"[up: an over-long log line was dropped]\n"
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            self._note(line, proc.pid)
            self.sink(line)

    def _note(self, line: str, pid: int) -> None:
        """Learn from the child's own structured lines whether it serves or refused to start."""
        if not line.startswith("{"):
            return
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return
        if not isinstance(record, dict):
            return
        if record.get("message") == "serving" and record.get("pid") == pid:
            port = record.get("port")
            self.serving_port = port if isinstance(port, int) else None
        elif record.get("level") == "CRITICAL":
            self.refusal = record

    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_tail(self) -> str:
        return "\n".join(f"    {line}" for line in self.tail) or "    (no output)"

    def exit_reason(self) -> str:
        code = self.proc.returncode if self.proc else None
        if self.refusal is not None:
            message = str(self.refusal.get("message", "")).removeprefix("refusing to start: ")
            fix = self.refusal.get("fix")
            reason = f"{self.name} refused to start: {message}"
            if fix:
                reason += f"\n  fix: {fix}"
            if "cannot listen on" in message:
                holder = port_holder(self.port)
                if holder:
                    reason += f"\n  port {self.port} is held by {holder}"
            return reason
        return (
            f"{self.name} exited with code {code} while starting; last log lines:\n"
            f"{self.log_tail()}"
        )

    async def wait_serving(self, limit_s: float) -> None:
        """Until this child (not whatever else may answer on its address) serves."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        async with aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.running():
                    await self._drain_output()
                    raise StartError(self.exit_reason())
                if self._holds_its_port():
                    if self.name in HTTP_CHILDREN:
                        if await http_ready(self.address, HTTP_CHILDREN[self.name]):
                            return
                    else:
                        with contextlib.suppress(aio.AioRpcError):
                            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                                return
                elif self.serving_port is not None:
                    raise StartError(
                        f"{self.name} listens on port {self.serving_port}, not {self.port}"
                    )
                if loop.time() > deadline:
                    raise StartError(
                        f"{self.name} not SERVING on {self.address} after {limit_s:g}s; "
                        f"last log lines:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.1)

    def _holds_its_port(self) -> bool:
        """The child itself listens on its port: its own "serving" line says so or, when its
        log level hides that line, /proc shows its socket."""
        if self.serving_port is not None:
            return self.serving_port in (self.port, 0)
        return self.proc is not None and self.proc.pid in listener_pids(self.port)

    async def _drain_output(self) -> None:
        if self.pump is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.pump), 1.0)

    async def terminate(self) -> int | None:
        """SIGTERM (the services drain on it), then SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_WAIT_S)
            except TimeoutError:
                say(f"{self.name} did not stop in {STOP_WAIT_S:g}s; killing it")
                self.proc.kill()
                await self.proc.wait()
        await self._drain_output()
        return self.proc.returncode


async def http_ready(address: str, path: str) -> bool:
    """GET ``path`` on ``address``: True on a 200 answer (the face's readiness probe)."""
    host, port = address.rsplit(":", 1)
    try:
        async with asyncio.timeout(1.0):
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return status_line.split(b" ")[1:2] == [b"200"]


def say(message: str) -> None:
    print(f"up | {message}", flush=True)


def make_sink(name: str, mode: str, logs_dir: Path) -> tuple[Callable[[str], None], IO[str] | None]:
    if mode == "files":
        handle = (logs_dir / f"{name}.log").open("a", encoding="utf-8")

        def to_file(line: str) -> None:
            handle.write(line + "\n")
            handle.flush()

        return to_file, handle
    width = max(len(n) for n in ORDER)

    def to_stdout(line: str) -> None:
        print(f"{name:<{width}} | {line}", flush=True)

    return to_stdout, None


async def supervise(child: Child, stopping: asyncio.Event) -> None:
    """Restart a child that died, with exponential backoff, until the mesh is stopping."""
    backoff = BACKOFF_FIRST_S
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        assert child.proc is not None
        code = await child.proc.wait()
        if stopping.is_set():
            return
        if loop.time() - started > HEALTHY_RUN_S:
            backoff = BACKOFF_FIRST_S
        say(f"{child.name} exited with code {code}; restarting in {backoff:g}s")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), backoff)
        if stopping.is_set():
            return
        backoff = min(backoff * 2, BACKOFF_MAX_S)
        await child.spawn()
        say(f"{child.name} restarted (pid {child.proc.pid if child.proc else '?'})")


def prepare_data_dir(env: dict[str, str]) -> Path:
    """The data directory and its logs directory, private to this user."""
    data_dir = Path(env.get("TOOLMESH_DATA_DIR", "var"))
    logs_dir = data_dir / "logs"
    try:
        logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        data_dir.chmod(0o700)
        logs_dir.chmod(0o700)
    except OSError as error:
        raise StartError(
            f"cannot use the data directory {data_dir} (TOOLMESH_DATA_DIR): "
            f"{error.strerror or error}; point TOOLMESH_DATA_DIR at a directory you can write"
        ) from None
    return logs_dir


async def up(args: argparse.Namespace) -> int:
    # Everything `up` and its children create (databases, keys, logs) is this user's alone.
    os.umask(0o077)
    env = child_environment(dict(os.environ), args.base_port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)

    children: list[Child] = []
    handles: list[IO[str]] = []
    supervisors: list[asyncio.Task[None]] = []
    status = 0
    try:
        logs_dir = prepare_data_dir(env)
        check_ports_free(env)
        for wave in WAVES:
            started: list[Child] = []
            for name in wave:
                sink, handle = make_sink(name, args.logs, logs_dir)
                if handle is not None:
                    handles.append(handle)
                child = Child(name, env, sink)
                children.append(child)
                started.append(child)
                await child.spawn()
            for child in started:
                starting = asyncio.create_task(child.wait_serving(args.timeout))
                stop_wait = asyncio.create_task(stopping.wait())
                await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                if stopping.is_set():
                    starting.cancel()
                    return 0
                starting.result()
                pid = child.proc.pid if child.proc else "?"
                say(f"{child.name} SERVING on {child.address} (pid {pid})")
        supervisors = [asyncio.create_task(supervise(c, stopping)) for c in children]
        where = f"logs in {logs_dir}" if args.logs == "files" else "logs below"
        gateway, face = children[-2], children[-1]
        say(
            f"toolmesh is up: gateway at {gateway.address}, MCP at http://{face.address}/mcp "
            f"({where}; Ctrl-C stops)"
        )
        await stopping.wait()
    except StartError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        status = EXIT_START_FAILED
    finally:
        stopping.set()
        if children:
            say("stopping")
        # Outermost first (the face, then the gateway), so each drains its in-flight calls
        # while what it calls still runs.
        groups = [[c for c in children if c.name == name] for name in OUTERMOST]
        groups.append([c for c in children if c.name not in OUTERMOST])
        for group in groups:
            codes = await asyncio.gather(*(c.terminate() for c in group))
            for child, code in zip(group, codes, strict=True):
                if code is not None:
                    say(f"{child.name} stopped (exit code {code})")
        for task in supervisors:
            task.cancel()
        await asyncio.gather(*supervisors, return_exceptions=True)
        for handle in handles:
            handle.close()
    return status


def run(args: argparse.Namespace) -> int:
    return asyncio.run(up(args))
