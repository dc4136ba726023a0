#!/usr/bin/env python3
"""Summarises the windows bench/churn.sh recorded: one row per window, one per condition.

usage: churn_report.py DATA_DIR WINDOW_S RATE VERSION [BITRATE [UPTIME]]
"""

import json
import re
import statistics
import sys
from pathlib import Path

COUNTERS = ("netmon_link_change_major", "magicsock_rebind_calls", "magicsock_send_derp_queued")


def counters(path):
    out = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in COUNTERS:
            out[parts[0]] = int(float(parts[1]))
    return out


def delta(data, w, name):
    total = 0
    for node in (1, 2):
        before = counters(data / f"{w}.n{node}.before").get(name, 0)
        after = counters(data / f"{w}.n{node}.after").get(name, 0)
        total += after - before
    return total


def throughput(data, w):
    """Median and minimum of the 1 s samples, in Mbit/s (None when iperf3 failed)."""
    try:
        doc = json.loads((data / f"{w}.iperf.json").read_text())
    except (OSError, ValueError):
        return None, None
    samples = [iv["sum"]["bits_per_second"] / 1e6 for iv in doc.get("intervals", [])]
    if not samples:
        return None, None
    return statistics.median(samples), min(samples)


def ping(data, w):
    """(sent, received, longest run of lost replies in seconds) from `ping -D -i 0.01`."""
    text = (data / f"{w}.ping").read_text(errors="replace")
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    if not m:
        return 0, 0, None
    sent, received = int(m.group(1)), int(m.group(2))
    seqs = sorted({int(s) for s in re.findall(r"icmp_seq=(\d+) ttl=", text)})
    longest = 0
    prev = 0  # sequence numbers start at 1
    for s in seqs + [sent + 1]:
        longest = max(longest, s - prev - 1)
        prev = s
    return sent, received, longest * 0.01


def connects(data, w):
    lines = (data / f"{w}.connect").read_text().split()
    return lines.count("ok"), len(lines)


def churn_counts(data, w):
    adds = dels = fails = 0
    for node in (1, 2):
        p = data / f"{w}.n{node}.churn"
        if p.exists():
            kv = dict(x.split("=") for x in p.read_text().split())
            adds += int(kv["adds"])
            dels += int(kv["dels"])
            fails += int(kv["fails"])
    return adds, dels, fails


def main():
    data = Path(sys.argv[1])
    window, rate, version = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    bitrate = sys.argv[5] if len(sys.argv) > 5 else "uncapped"
    load = sys.argv[6].strip() if len(sys.argv) > 6 else ""
    windows = [line.split() for line in (data / "windows").read_text().splitlines() if line.strip()]
    rows = []
    for w, kind in windows:
        med, low = throughput(data, w)
        sent, received, gap = ping(data, w)
        ok, tried = connects(data, w)
        rows.append(
            {
                "w": w,
                "kind": kind,
                "mbps": med,
                "min": low,
                "loss": (100.0 * (sent - received) / sent) if sent else None,
                "gap": gap,
                "ok": ok,
                "tried": tried,
                "major": delta(data, w, "netmon_link_change_major"),
                "rebind": delta(data, w, "magicsock_rebind_calls"),
                "derp": delta(data, w, "magicsock_send_derp_queued"),
                "churn": churn_counts(data, w) if kind == "churn" else None,
            }
        )

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    print(f"# Pod churn and cross-node traffic ({version})\n")
    print(f"{window} s windows, churn = {rate} pod ADD+DEL per second on each node; TCP stream {bitrate}; both nodes' tailscaled counters.")
    if load:
        print(f"At the end: {load}")
    print()
    print("| window | TCP Mbit/s (median / min of 1 s) | ping loss | longest gap | new connections | major link changes | rebinds | DERP-queued packets | churn ADD/DEL/failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        churn = "-" if r["churn"] is None else "/".join(str(x) for x in r["churn"])
        print(
            f"| {r['w']} ({r['kind']}) | {fmt(r['mbps'], '.0f')} / {fmt(r['min'], '.0f')} | {fmt(r['loss'], '.2f')} % "
            f"| {fmt(r['gap'], '.2f')} s | {r['ok']}/{r['tried']} | {r['major']} | {r['rebind']} | {r['derp']} | {churn} |"
        )
    quiet = [r["mbps"] for r in rows if r["kind"] == "quiet" and r["mbps"] is not None]
    churn = [r["mbps"] for r in rows if r["kind"] == "churn" and r["mbps"] is not None]
    print()
    if quiet and churn:
        ratio = statistics.median(churn) / statistics.median(quiet)
        print(f"throughput under churn / without: {ratio:.2f} (medians of the windows' medians)")
    for kind in ("quiet", "churn"):
        sel = [r for r in rows if r["kind"] == kind]
        lost = sum(1 for r in sel if r["loss"])
        print(
            f"{kind}: windows with ping loss {lost}/{len(sel)}, connections {sum(r['ok'] for r in sel)}/{sum(r['tried'] for r in sel)}, "
            f"major link changes {sum(r['major'] for r in sel)}, rebinds {sum(r['rebind'] for r in sel)}"
        )


if __name__ == "__main__":
    main()
