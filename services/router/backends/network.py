"""Where a backend may be reached, and which programs a stdio backend may start.

Hosts: an allowlist of host names and IP networks (router setting ``backend_allowed_hosts``).
A host that is an IP literal must lie in a listed network; a name listed as such (exact, or a
``.suffix`` entry) is trusted as its operator's DNS; any other name must resolve only to listed
networks. Link-local and cloud metadata addresses are refused whatever the list says, unless a
listed network lies inside those ranges (an operator who means it names them). Checks run at
registration and again at every connection: HTTP connections go through ``CheckedNetwork``,
which resolves the name itself, checks every address and connects to the checked address, so a
DNS answer that changes between the check and the connection (DNS rebinding) gains nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpcore2
import httpx2

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Never reached unless named: link-local (where cloud metadata services live) and the metadata
# addresses that sit elsewhere (AWS IPv6, Alibaba, Oracle).
ALWAYS_REFUSED: tuple[IpNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",
        "fe80::/10",
        "fd00:ec2::254/128",
        "100.100.100.200/32",
        "192.0.0.192/32",
    )
)
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata", "instance-data"})


class HostRefused(Exception):
    """The host is not on the allowlist (the message says why, without secrets)."""


def _unmapped(address: IpAddress) -> IpAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class HostPolicy:
    names: frozenset[str]
    suffixes: tuple[str, ...]
    networks: tuple[IpNetwork, ...]

    @classmethod
    def parse(cls, text: str) -> HostPolicy:
        """Parse the comma-separated setting; ValueError names a bad entry."""
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[IpNetwork] = []
        for raw in text.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            label = entry.removeprefix(".")
            if not label or any(not part for part in label.split(".")) or "/" in label:
                raise ValueError(f"backend_allowed_hosts: {raw.strip()!r} is not a host or CIDR")
            if entry.startswith("."):
                suffixes.append(entry)
            else:
                names.add(entry)
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    def _named(self, host: str) -> bool:
        return host in self.names or any(host.endswith(s) or host == s[1:] for s in self.suffixes)

    def address_problem(self, address: IpAddress, *, named: bool = False) -> str | None:
        """Why ``address`` may not be reached, or None. ``named``: reached through a host name
        the operator listed, so only the always-refused ranges apply."""
        address = _unmapped(address)
        for refused in ALWAYS_REFUSED:
            if address.version == refused.version and address in refused:
                explicit = any(
                    n.version == refused.version and n.subnet_of(refused) and address in n  # type: ignore[arg-type]
                    for n in self.networks
                )
                if not explicit:
                    return f"{address} is a link-local or cloud metadata address"
                return None
        if named:
            return None
        if any(address.version == n.version and address in n for n in self.networks):
            return None
        return f"{address} is not in backend_allowed_hosts"

    def host_problem(self, host: str) -> str | None:
        """Static check of a host as written (no DNS): an IP literal or a name."""
        host = host.strip("[]").lower()
        try:
            return self.address_problem(ipaddress.ip_address(host))
        except ValueError:
            pass
        if host in METADATA_NAMES:
            return f"{host} is a cloud metadata name"
        return None

    async def resolve_checked(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host``, every one allowed; HostRefused otherwise."""
        host = host.strip("[]").lower()
        problem = self.host_problem(host)
        if problem:
            raise HostRefused(problem)
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        named = self._named(host)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError:
            raise HostRefused(f"{host} does not resolve") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for text in addresses:
            problem = self.address_problem(ipaddress.ip_address(text.split("%")[0]), named=named)
            if problem:
                raise HostRefused(f"{host} resolves to a refused address ({problem})")
        if not addresses:
            raise HostRefused(f"{host} does not resolve")
        return addresses


class CheckedNetwork(httpcore2.AsyncNetworkBackend):
    """httpcore network backend that connects only to addresses the policy allows.

    The name is resolved here, each address checked, and the connection made to a checked
    address; TLS still verifies the certificate against the URL's host name."""

    def __init__(self, policy: HostPolicy) -> None:
        self._policy = policy
        self._inner = httpcore2.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        try:
            addresses = await self._policy.resolve_checked(host, port)
        except HostRefused as refused:
            raise httpcore2.ConnectError(str(refused)) from None
        error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore2.ConnectError as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        raise httpcore2.ConnectError("unix sockets are not allowed for backends")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class CheckedTransport(httpx2.AsyncHTTPTransport):
    """httpx transport over ``CheckedNetwork``; ignores proxy settings of the environment
    (a proxy would resolve names where the policy cannot see them)."""

    def __init__(self, policy: HostPolicy) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=httpx2.create_ssl_context(trust_env=False),
            network_backend=CheckedNetwork(policy),
        )


@dataclass(frozen=True)
class CommandPolicy:
    """Which executables a stdio backend may start (router setting backend_stdio_commands).

    A program name is looked up on the router's PATH and then in its interpreter's directory;
    the resolved path is what runs (no shell) and what the allowlist is checked against."""

    entries: tuple[str, ...]
    # An empty list allows anything on PATH only when this is true (dev).
    open_when_empty: bool

    @classmethod
    def parse(cls, text: str, *, open_when_empty: bool) -> CommandPolicy:
        return cls(tuple(e.strip() for e in text.split(",") if e.strip()), open_when_empty)

    def resolve(self, program: str) -> str:
        """The executable's absolute path, or ValueError saying why it may not run."""
        if not program or "\x00" in program:
            raise ValueError("is empty")
        # PATH, then the directory of the router's own interpreter (a virtualenv's bin/, where
        # `make install` puts the example MCP servers).
        search = os.pathsep.join(
            [os.environ.get("PATH", os.defpath), str(Path(sys.executable).parent)]
        )
        found = shutil.which(program, path=search)
        if found is None:
            raise ValueError(f"{program!r} is not an executable on the router's PATH")
        real = os.path.realpath(found)
        if not self.entries:
            if self.open_when_empty:
                return found
            raise ValueError(
                "stdio backends are disabled: the router lists no allowed commands "
                "(backend_stdio_commands)"
            )
        for entry in self.entries:
            if entry.endswith("/"):
                if Path(real).is_relative_to(os.path.realpath(entry)):
                    return found
            elif os.sep in entry:
                if os.path.realpath(entry) == real:
                    return found
            elif entry == program:
                return found
        raise ValueError(f"{program!r} is not on the router's backend_stdio_commands")
