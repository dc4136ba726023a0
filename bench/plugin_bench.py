#!/usr/bin/env python3
"""Side-by-side timing of whole CNI invocations, interleaved in one run.

Runs inside a host network namespace prepared by bench/plugin.sh. For every iteration, in a
rotating order: headcni ADD+DEL, the reference ptp+host-local ADD+DEL, and the kernel's floor
(a veth pair created straight into a namespace and deleted, timed inside one process). Also
STATUS of headcni and the peak RSS of each headcni invocation.
"""

import json
import os
import statistics
import subprocess
import sys

ITER = int(os.environ.get("ITER", "200"))
BIN = os.environ["HEADCNI_BIN"]          # dir with headcni + headcni-ipam
REF = os.environ.get("REF_BIN", "/usr/lib/cni")
FLOOR = os.environ["FLOOR_BIN"]          # examples/veth_floor
SCRATCH = os.environ["SCRATCH"]
PODS = os.environ["PODS"].split(",")     # three pod netns paths
IPAM = os.environ.get("HEADCNI_IPAM", "headcni-ipam")

CNI_PATH = f"{BIN}:{REF}"

headcni_conf = {
    "cniVersion": "1.1.0", "name": "bench", "type": "headcni",
    "pod_cidr": "10.244.0.0/16", "mtu": 1280,
    "ipam": {"type": IPAM, "dataDir": f"{SCRATCH}/ipam-headcni"},
    "run_dir": f"{SCRATCH}/run", "log_file": f"{SCRATCH}/headcni.log",
}
if IPAM == "host-local":
    headcni_conf["cniVersion"] = "1.0.0"
ref_conf = {
    "cniVersion": "1.0.0", "name": "benchref", "type": "ptp", "mtu": 1280,
    "ipam": {"type": "host-local", "subnet": "10.245.0.0/16", "dataDir": f"{SCRATCH}/ipam-ref"},
}


SPAWN = os.environ["SPAWN_BIN"]          # bench/spawn.c: times a child, reads its peak RSS


def run_rss(exe, env, stdin):
    """Runs one process; returns (seconds, peak RSS in KiB), as measured by the spawn helper."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_PATH": CNI_PATH,
                "HEADCNI_LOG_LEVEL": "warn", **env}
    proc = subprocess.run([SPAWN, exe], input=stdin, capture_output=True, env=full_env)
    last = proc.stderr.decode().strip().splitlines()[-1].split()
    if proc.returncode != 0 or last[0] != "SPAWN":
        sys.exit(f"{exe} {env.get('CNI_COMMAND')} failed: {proc.stdout.decode()} {proc.stderr.decode()}")
    return int(last[1]) / 1e6, int(last[2])


def cni_env(cmd, cid, netns):
    return {"CNI_COMMAND": cmd, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0", "CNI_NETNS": netns}


def floor_once(netns, name):
    def one(args):
        p = subprocess.run([FLOOR, *args], capture_output=True, text=True, check=True)
        return int(p.stderr.strip()) / 1e6
    return one(["create", netns, name]), one(["delete", name])


def main():
    samples = {k: [] for k in ["headcni_add", "headcni_del", "ref_add", "ref_del",
                                "floor_create", "floor_delete", "status"]}
    rss = []
    hc_exe = os.path.join(BIN, "headcni")
    ref_exe = os.path.join(REF, "ptp")
    hc_stdin = json.dumps(headcni_conf).encode()
    ref_stdin = json.dumps(ref_conf).encode()
    status_conf = dict(headcni_conf, cniVersion="1.1.0")
    status_stdin = json.dumps(status_conf).encode()

    def headcni(i):
        cid = f"hc{i}"
        t, kib = run_rss(hc_exe, cni_env("ADD", cid, PODS[0]), hc_stdin)
        samples["headcni_add"].append(t)
        rss.append(kib)
        t, kib = run_rss(hc_exe, cni_env("DEL", cid, PODS[0]), hc_stdin)
        samples["headcni_del"].append(t)
        rss.append(kib)

    def reference(i):
        cid = f"ref{i}"
        samples["ref_add"].append(run_rss(ref_exe, cni_env("ADD", cid, PODS[1]), ref_stdin)[0])
        samples["ref_del"].append(run_rss(ref_exe, cni_env("DEL", cid, PODS[1]), ref_stdin)[0])

    def floor(i):
        c, d = floor_once(PODS[2], f"hcfloor{i % 10}")
        samples["floor_create"].append(c)
        samples["floor_delete"].append(d)

    def status(i):
        t, kib = run_rss(hc_exe, {"CNI_COMMAND": "STATUS"}, status_stdin)
        samples["status"].append(t)
        rss.append(kib)

    order = [headcni, reference, floor, status]
    for i in range(ITER):
        k = i % len(order)
        for fn in order[k:] + order[:k]:
            fn(i)

    def med(key):
        return statistics.median(samples[key]) * 1e3

    def p90(key):
        return statistics.quantiles(samples[key], n=10)[-1] * 1e3

    report = {k: {"median_ms": round(med(k), 3), "p90_ms": round(p90(k), 3)} for k in samples}
    report["headcni_peak_rss_kib"] = max(rss)
    report["ratios"] = {
        "add_vs_ref": round(med("headcni_add") / med("ref_add"), 3),
        "del_vs_ref": round(med("headcni_del") / med("ref_del"), 3),
        "del_vs_floor_delete": round(med("headcni_del") / med("floor_delete"), 3),
    }
    report["goals"] = {
        "add <= 0.3 x ref": report["ratios"]["add_vs_ref"] <= 0.3,
        "del <= 0.75 x ref": report["ratios"]["del_vs_ref"] <= 0.75,
        "del <= 1.2 x floor": report["ratios"]["del_vs_floor_delete"] <= 1.2,
        "status < 1 ms": med("status") < 1.0,
        "peak rss < 8 MiB": max(rss) < 8 * 1024,
    }
    report["iterations"] = ITER
    report["ipam"] = IPAM
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
