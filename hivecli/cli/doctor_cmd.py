"""`hive doctor [ADDRESS]`: one block to paste into a bug report, with a network diagnosis."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from hivecli.cli import _output
from hivecli.cli._network import AnnounceOption, HostOption, PortOption, SwarmKeyOption


def doctor(
    address: Annotated[
        str | None,
        typer.Argument(
            help="Multiaddr of a peer to test against, e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW... "
            "(joins its DHT for a moment: dial-back, round trip, clock offset)."
        ),
    ] = None,
    host: HostOption = "0.0.0.0",
    port: PortOption = 0,
    announce: AnnounceOption = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for each network step with ADDRESS.")
    ] = 10.0,
    swarm_key: SwarmKeyOption = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout instead of text.")
    ] = False,
) -> None:
    """Print versions, network and kernel settings to paste into a bug report; with ADDRESS, test reaching that peer.

    Shows hive, Python, platform, torch, CUDA and CPU details; the network interfaces and the addresses a peer started with the same --host/--port/--announce would announce; whether --port is free on --host (0, the default of `hive start`, picks a free port at start) and a free ephemeral port; Linux kernel settings that matter on long links, with the `sysctl` commands to fix them (only read, never changed); the room in /dev/shm, where peers on one host average. With ADDRESS, a temporary peer listening on --host/--port joins that peer's DHT and reports whether the peer can dial it back (public, unreachable or unknown, with advice), the round trip to it and the clock offsets against it and a few more DHT peers (positive: theirs is ahead). Exit code 3 if ADDRESS does not answer, 2 if it is malformed.

    --json prints one document with these stable fields: hive {version, location}; python {version, implementation, executable}; platform {system, release, machine, description}; cpu {count, usable}; torch {installed, version, threads, error}; cuda {version, available, device_count, devices: list of {index, name, memory_gib, capability}, error}; interfaces: list of {name, up, mtu, speed_mbps, addresses}; announce: list of multiaddrs; ports {host, port, free, error, ephemeral}; kernel {settings: {sysctl name: value or null}, advice: list of strings}; shared_memory {directory, size_bytes, free_bytes (null where missing), advice: list of strings}; reachability: null without ADDRESS, else {address, peer_id, status, advice, checked {status, reachable, observed_host, checked_by, failures}, rtt_ms, clock_offset_s, peers: list of {peer_id, rtt_ms, clock_offset_s, error}, visible: list of multiaddrs}. Times are in rtt_ms milliseconds and clock_offset_s seconds; null where not measured.
    """
    from hivecli import doctor as checks
    from hivecli.cli._network import announce_maddrs, listen_maddr, net_settings
    from hivecli.net.multiaddr import Multiaddr, parse_peer_maddr

    listen = listen_maddr(host, port)  # ConfigError for a host that is not an IP
    announced = announce_maddrs(announce, port)
    if address is not None:
        parse_peer_maddr(address)  # a malformed ADDRESS fails before anything else runs
    settings = net_settings(swarm_key, relay=False)  # a bad key file fails here, ADDRESS or not
    report: dict[str, Any] = {
        **checks.system_info(),
        **checks.torch_info(),
        "interfaces": checks.interface_info(),
        "announce": checks.announce_info(Multiaddr.parse(listen), [Multiaddr.parse(m) for m in announced]),
        "ports": checks.port_info(host, port),
        "kernel": checks.kernel_info(),
        "shared_memory": checks.shared_memory_info(),
        "reachability": None,
    }
    if address is not None:
        report["reachability"] = checks.probe_peer(address, listen, announced, timeout, settings)
    if json_output:
        print(json.dumps(report, default=str), flush=True)
    else:
        _print_report(report)


def _print_report(r: dict[str, Any]) -> None:
    """The text block: "- name: value" lines (nested ones indented), plain text to paste as is."""
    lines = ["hive doctor (paste this block into your bug report)"]
    add = lines.append
    add(f"- hive: {r['hive']['version']} ({r['hive']['location']})")
    add(f"- python: {r['python']['version']} ({r['python']['implementation']}, {r['python']['executable']})")
    add(f"- platform: {r['platform']['description']}")
    add(f"- cpu: {r['cpu']['count']} cores ({r['cpu']['usable']} usable by this process)")
    add(f"- torch: {_torch_text(r['torch'])}")
    add(f"- cuda: {_cuda_text(r['cuda'], r['torch'])}")
    for d in r["cuda"]["devices"]:
        add(f"    {d['index']}: {d['name']}, {d['memory_gib']} GiB, compute capability {d['capability']}")
    add("- interfaces:")
    for i in r["interfaces"]:
        state = {True: "up", False: "down", None: "state unknown"}[i["up"]]
        add(f"    {i['name']} ({state}, mtu {i['mtu']}): {', '.join(i['addresses']) or 'no IP address'}")
    p = r["ports"]
    port_note = " (port 0: picked when the peer starts)" if p["port"] == 0 else ""
    add(f"- announce{port_note}: {', '.join(r['announce']) or 'no address'}")
    where = f"[{p['host']}]" if ":" in p["host"] else p["host"]
    state = "free" if p["free"] else f"NOT free ({p['error']})"
    add(f"- port {where}:{p['port']}: {state}; a free ephemeral port: {p['ephemeral'] or 'none'}")
    settings = r["kernel"]["settings"]
    if any(v is not None for v in settings.values()):
        add("- kernel:")
        for name, value in settings.items():
            shown = "unreadable" if value is None else " ".join(map(str, value)) if isinstance(value, list) else value
            add(f"    {name} = {shown}")
    else:
        add("- kernel: settings not readable here (not Linux?)")
    shm = r["shared_memory"]
    if shm["free_bytes"] is None:
        add(f"- shared memory: {shm['directory']} missing")
    else:
        add(
            f"- shared memory: {shm['directory']}, {shm['free_bytes'] / 2**30:.1f} of {shm['size_bytes'] / 2**30:.1f} GiB free"
        )
    advice = [*r["kernel"]["advice"], *shm["advice"]]
    reach = r["reachability"]
    if reach is not None:
        add(f"- peer: {reach['address']}")
        add(f"    reachability: {reach['status']}: {reach['advice']}")
        for failure in reach["checked"]["failures"][:4]:
            add(f"      dial-back failed: {failure}")
        add(f"    round trip: {reach['rtt_ms']:.2f} ms")
        for peer in reach["peers"]:
            add(f"    clock offset vs {peer['peer_id']}: {_offset_text(peer)}")
        add(f"    this test peer's addresses: {', '.join(reach['visible']) or 'none'}")
        far = [x for x in reach["peers"] if x["clock_offset_s"] is not None and abs(x["clock_offset_s"]) > 1.0]
        if far:
            advice.append(
                f"{len(far)} peer clock(s) differ from ours by over 1 s: DHT records expire at absolute times, "
                "so run NTP (e.g. chrony or systemd-timesyncd) on every machine"
            )
    for text in advice:
        add(f"- advice: {text}")
    for line in lines:
        _output.stdout.print(line, markup=False)


def _torch_text(torch: dict[str, Any]) -> str:
    if not torch["installed"]:
        return f"not importable ({torch['error']})"
    return f"{torch['version']}, {torch['threads']} threads"


def _cuda_text(cuda: dict[str, Any], torch: dict[str, Any]) -> str:
    if cuda["error"]:
        return f"{cuda['version'] or 'unknown version'}, error: {cuda['error']}"
    if cuda["available"]:
        return f"{cuda['version']}, {cuda['device_count']} device(s)"
    if cuda["version"]:
        return f"not available (torch built with CUDA {cuda['version']}: no GPU or driver visible)"
    return "not available (CPU-only torch)" if torch["installed"] else "unknown (no torch)"


def _offset_text(peer: dict[str, Any]) -> str:
    """e.g. "+0.1 ms (round trip 0.25 ms)"; seconds once the offset is a second or more."""
    if peer.get("error"):
        return f"not measured ({peer['error']})"
    offset = peer["clock_offset_s"]
    if offset is None:
        shown = "unknown (the peer sent no valid time)"
    else:
        shown = f"{offset * 1000:+.2f} ms" if abs(offset) < 1 else f"{offset:+.2f} s"
    return f"{shown} (round trip {peer['rtt_ms']:.2f} ms)"
