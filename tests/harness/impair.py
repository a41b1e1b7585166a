"""Network impairments for the call tests, inside the test run's private namespace.

Everything runs on one host (the bridge address), so the browsers' media and signaling go
through `lo`; an impairment picks its packets by port. This kernel has no sch_netem: rates
are capped with htb + tbf on `lo` (u32 filters on the UDP source port: that side's uplink),
paths are cut with iptables, TCP connections are reset with `ss -K`. Each helper returns an
undo function; tests call it in `finally`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable

from tests.harness.programs import require_program

Undo = Callable[[], None]


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def iptables(*args: str, check: bool = True) -> None:
    _run(require_program("iptables"), "-w", *args, check=check)


def _rules(rules: list[tuple[str, ...]], table: str = "filter") -> Undo:
    for rule in rules:
        iptables("-t", table, "-I", *rule)

    def undo() -> None:
        for rule in rules:
            iptables("-t", table, "-D", *rule, check=False)

    return undo


def drop_udp_ports(ports: Iterable[int]) -> Undo:
    """Every packet to or from these local UDP ports is dropped (a phone leaving Wi-Fi)."""
    return _rules(
        [
            rule
            for port in ports
            for rule in (
                ("INPUT", "-p", "udp", "--dport", str(port), "-j", "DROP"),
                ("OUTPUT", "-p", "udp", "--sport", str(port), "-j", "DROP"),
            )
        ]
    )


def blackhole_tcp_port(local_port: int) -> Undo:
    """The TCP connection from this local (client) port goes silent both ways: no reset, no
    error, the socket just never hears back (a dead path after a network switch)."""
    return _rules(
        [
            ("INPUT", "-p", "tcp", "--dport", str(local_port), "-j", "DROP"),
            ("OUTPUT", "-p", "tcp", "--sport", str(local_port), "-j", "DROP"),
        ]
    )


def refuse_tcp(server_port: int) -> Undo:
    """New connections to `server_port` are refused at once (the socket's reconnects fail)."""
    return _rules([("OUTPUT", "-p", "tcp", "--dport", str(server_port), "--syn", "-j", "REJECT",
                    "--reject-with", "tcp-reset")])  # fmt: skip


def reset_tcp(server_port: int) -> None:
    """Reset every established TCP connection to or from `server_port` (both ends)."""
    ss = require_program("ss")
    _run(ss, "-K", "-t", "state", "established", f"( dport = :{server_port} or sport = :{server_port} )")


def client_tcp_ports(server_port: int) -> set[int]:
    """Local ports of the established client connections to `server_port`."""
    out = _run(require_program("ss"), "-Htn", "state", "established", f"( dport = :{server_port} )").stdout
    ports = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            ports.add(int(fields[2].rsplit(":", 1)[1]))
    return ports


def cap_udp_uplink(ports: Iterable[int], kbit: int) -> Undo:
    """Cap what leaves these local UDP ports at `kbit` kbit/s with a short (200 ms) queue,
    like a weak mobile uplink; everything else on `lo` is untouched."""
    tc = require_program("tc")
    _run(tc, "qdisc", "replace", "dev", "lo", "root", "handle", "1:", "htb", "default", "20", "r2q", "1000")
    _run(tc, "class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", f"{kbit}kbit",
         "ceil", f"{kbit}kbit")  # fmt: skip
    _run(tc, "class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb", "rate", "10gbit")
    _run(tc, "qdisc", "add", "dev", "lo", "parent", "1:10", "handle", "10:", "tbf", "rate", f"{kbit}kbit",
         "burst", "4kb", "latency", "200ms")  # fmt: skip
    for i, port in enumerate(ports):
        _run(tc, "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", str(i + 1), "u32",
             "match", "ip", "protocol", "17", "0xff", "match", "ip", "sport", str(port), "0xffff",
             "flowid", "1:10")  # fmt: skip

    def undo() -> None:
        _run(tc, "qdisc", "del", "dev", "lo", "root", check=False)

    return undo
