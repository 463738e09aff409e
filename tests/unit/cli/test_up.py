"""`toolmesh up`'s own checks: base ports, and who holds a port."""

from __future__ import annotations

import argparse
import os
import socket

import pytest

from cli.up import base_port, listener_pids, port_holder, ports_of


@pytest.mark.parametrize("text", ["1024", "50051", "65530", "0"])
def test_base_ports_whose_five_ports_fit(text: str) -> None:
    assert base_port(text) == int(text)


@pytest.mark.parametrize(
    ("text", "says"),
    [("65531", r"face's\) at 65536"), ("-1", "choose a base port"), ("x", "not a port")],
)
def test_base_ports_that_do_not_fit_are_refused(text: str, says: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        base_port(text)


def test_privileged_base_ports_need_root() -> None:
    if os.geteuid() == 0:
        assert base_port("80") == 80
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="need root"):
            base_port("80")


def test_the_holder_of_a_port_is_named_with_pid_and_command() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        holder = port_holder(port)
        # How `up` tells that its own child holds its port when the child's lines are hidden.
        assert listener_pids(port) == {os.getpid()}
    assert holder is not None and holder.startswith(f"pid {os.getpid()} (")
    assert port_holder(port) is None
    assert listener_pids(port) == set()


def test_ports_of_a_service_follow_its_settings() -> None:
    env = {"TOOLMESH_ROUTER_PORT": "7000", "TOOLMESH_METRICS_PORT": "0"}
    assert ports_of("router", env) == {
        "TOOLMESH_ROUTER_PORT": 7000,
        "TOOLMESH_ROUTER_METRICS_PORT": 0,
    }
    assert ports_of("memory", {})["TOOLMESH_MEMORY_METRICS_PORT"] == 9454
