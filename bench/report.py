#!/usr/bin/env python3
"""Turn bench/run.sh's results into RESULTS.md (stdout), or check a smoke run.

    report.py RESULTS.jsonl COMMANDS.txt [CRITERION_DIR]   -> markdown on stdout
    report.py --check RESULTS.jsonl                         -> exit 1 if the run is broken
    report.py --table RESULTS.jsonl [PREVIOUS.jsonl]        -> the summary table alone
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = ["haproxy", "haproxy-splice", "nginx", "direct"]


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def sh(cmd):
    try:
        out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except Exception:
        return "unknown"


def check(rows):
    """A smoke run is broken if a scenario produced no figures, or sluice routed wrong,
    failed a connection, lost a tunnel or an idle connection."""
    problems = []
    seen = {(r["scenario"], r["system"]) for r in rows}
    for scenario in ["connrate", "throughput", "idle", "reload"]:
        for system in ["sluice", "haproxy", "nginx"]:
            if (scenario, system) not in seen:
                problems.append(f"no {scenario} result for {system}")
    if ("throughput", "haproxy-splice") not in seen:
        problems.append("no throughput result for haproxy-splice")
    for r in rows:
        where = f"{r['scenario']}/{r['system']}"
        if "error" in r:
            problems.append(f"{where}: {r['error']}")
            continue
        fails = r.get("failures", {})
        if r.get("reload_cmd_failures"):
            # A reload that was never applied makes the reload scenario measure nothing.
            problems.append(f"{where}: {r['reload_cmd_failures']} reload commands failed")
        for kind in ("wrong_backend", "corrupt"):
            if fails.get(kind):
                problems.append(f"{where}: {fails[kind]} {kind}")
        if r["system"] != "sluice":
            continue
        if r.get("failed"):
            problems.append(f"{where}: {r['failed']} failed connections {fails}")
        if r.get("ok") == 0:
            problems.append(f"{where}: no connection completed")
        for key in ("tunnels_cut", "lost", "failed_streams"):
            if r.get(key):
                problems.append(f"{where}: {key} = {r[key]}")
        if r.get("opened") is not None and r["opened"] != r["connections"]:
            problems.append(f"{where}: opened {r['opened']} of {r['connections']}")
    for p in problems:
        print("bench check:", p, file=sys.stderr)
    print(f"bench check: {len(rows)} results, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


def fmt(v, digits=0):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def mean(rows, key):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.mean(vals) if vals else None


def ratio(a, b):
    return None if a is None or not b else a / b


def ratio_cell(a, b):
    """`a / b` for a table cell, or a dash when either is missing."""
    rt = ratio(a, b)
    return "–" if rt is None else f"{rt:.2f}"


class Doc:
    def __init__(self):
        self.lines = []

    def __call__(self, s=""):
        self.lines.append(s)

    def table(self, head, rows):
        self("| " + " | ".join(head) + " |")
        self("|" + "---|" * len(head))
        for r in rows:
            self("| " + " | ".join(r) + " |")
        self()


def by_system(rows, scenario):
    out = {}
    for r in rows:
        if r["scenario"] == scenario and "error" not in r:
            out.setdefault(r["system"], []).append(r)
    return out


def ratios_line(doc, label, groups, key, goal_text):
    s = mean(groups.get("sluice", []), key)
    parts = []
    for peer in PEERS:
        m = mean(groups.get(peer, []), key)
        rt = ratio(s, m)
        if rt is not None:
            parts.append(f"sluice/{peer} **{rt:.2f}**")
    doc(f"- {label}: " + (", ".join(parts) or "no figures") + f" (goal: {goal_text})")


# The summary: (scenario, label, key, lower is better).
FIGURES = [
    ("connrate", "connections/s", "conns_per_s", False),
    ("connrate", "p99 µs", "p99_us", True),
    ("connrate", "edge CPU µs/conn", "edge_cpu_us_per_conn", True),
    ("throughput", "Gbit/s", "gbit_per_s", False),
    ("throughput", "edge CPU s/GiB", "edge_cpu_s_per_gib", True),
    ("idle", "bytes/idle conn", "bytes_per_conn", True),
    ("reload", "connections/s", "conns_per_s", False),
    ("reload", "p99 µs", "p99_us", True),
]


def summary(d, rows, previous):
    """One table: every scenario's figures for sluice, HAProxy, nginx and the backends
    directly, sluice's ratio to HAProxy and to direct, and sluice's figure in the previous
    run (`previous`: that run's rows, or [])."""
    head = ["scenario", "figure", "sluice", "HAProxy", "nginx", "direct",
            "sluice/HAProxy", "sluice/direct", "sluice, previous run"]
    out = []
    for scenario, label, key, _lower in FIGURES:
        g = by_system(rows, scenario)
        if not g:
            continue
        s = mean(g.get("sluice", []), key)
        h = mean(g.get("haproxy", []), key)
        n = mean(g.get("nginx", []), key)
        x = mean(g.get("direct", []), key)
        prev = mean(by_system(previous, scenario).get("sluice", []), key)
        digits = 2 if key in ("gbit_per_s", "edge_cpu_s_per_gib") else (1 if "cpu" in key else 0)
        out.append([scenario, label, fmt(s, digits), fmt(h, digits), fmt(n, digits),
                    fmt(x, digits), ratio_cell(s, h), ratio_cell(s, x), fmt(prev, digits)])
    quic = os.environ.get("BENCH_QUIC")
    for q in load(quic) if quic and os.path.exists(quic) else []:
        for label, sk, dk in [("QUIC Gbit/s, one flow", "sluice_gbit_per_s", "direct_gbit_per_s"),
                              (f"QUIC Gbit/s, {q.get('parallel_flows', '?')} flows",
                               "parallel_sluice_gbit_per_s", "parallel_direct_gbit_per_s")]:
            if sk in q:
                s_, x_ = statistics.mean(q[sk]), statistics.mean(q[dk])
                out.append(["quic", label, fmt(s_, 2), "–", "–", fmt(x_, 2), "–",
                            f"{s_ / x_:.2f}", "–"])
        if "rtt_sluice_us_p50_p99" in q:
            s_, x_ = q["rtt_sluice_us_p50_p99"][1], q["rtt_direct_us_p50_p99"][1]
            out.append(["quic", "round trip p99 µs", fmt(s_, 0), "–", "–", fmt(x_, 0), "–",
                        f"{s_ / x_:.2f}", "–"])
        if "heap_bytes_per_idle_flow" in q:
            out.append(["quic", "heap bytes/idle flow", fmt(q["heap_bytes_per_idle_flow"], 0),
                        "–", "–", "–", "–", "–", "–"])
    d.table(head, out)
    others(d, rows)


def others(d, rows):
    """Systems a partial run adds (the relay floors of finding 30): their connrate figures,
    each with its edge CPU per connection over HAProxy's and sluice's in the same run."""
    g = by_system(rows, "connrate")
    extra = sorted(set(g) - {"sluice", "haproxy", "haproxy-splice", "nginx", "direct"})
    if not extra:
        return
    key = "edge_cpu_us_per_conn"
    h, s = mean(g.get("haproxy", []), key), mean(g.get("sluice", []), key)
    out = []
    for system in extra:
        c = mean(g[system], key)
        out.append([system, fmt(mean(g[system], "conns_per_s"), 0),
                    fmt(mean(g[system], "p99_us"), 0), fmt(c, 1), ratio_cell(c, h), ratio_cell(c, s)])
    d.table(["connrate", "connections/s", "p99 µs", "edge CPU µs/conn", "CPU/HAProxy",
             "CPU/sluice"], out)


def main(argv):
    if argv[1] == "--check":
        return check(load(argv[2]))
    if argv[1] == "--table":
        d = Doc()
        prev = load(argv[3]) if len(argv) > 3 and os.path.exists(argv[3]) else []
        summary(d, load(argv[2]), prev)
        print("\n".join(d.lines))
        return 0
    rows = load(argv[1])
    commands = open(argv[2]).read().splitlines() if os.path.exists(argv[2]) else []
    micro = argv[3] if len(argv) > 3 and argv[3] else None

    d = Doc()
    # run.sh says which commit it built; asked here, git would see the report being written.
    commit = os.environ.get("BENCH_COMMIT") or sh("git rev-parse --short HEAD")
    d("# Benchmark results")
    d()
    d("Written by `bench/run.sh`; every figure below comes from one invocation of it, on one "
      "machine, with the systems alternating. Compare ratios within this file, not absolute "
      "figures across machines.")
    d()
    d(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    d(f"- commit: {commit}")
    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")
    d(f"- nproc: {os.cpu_count()}; CPU: {cpu}")
    d(f"- kernel: {platform.release()}")
    d(f"- sluice: release build, {sh('rustc --version')}")
    d(f"- HAProxy: {sh('haproxy -v')}")
    d(f"- nginx: {sh('nginx -v')}")
    d()
    d("## summary")
    d()
    d("Means over the rounds; ratios are sluice's figure over the other's (for µs, bytes and "
      "CPU, lower is better). The last column is sluice's figure in the run this one "
      "replaced (`bench/results.jsonl` before it).")
    d()
    previous = os.environ.get("BENCH_PREVIOUS")
    summary(d, rows, load(previous) if previous and os.path.exists(previous) else [])

    # connrate
    g = by_system(rows, "connrate")
    d("## connrate")
    d()
    d("Workers loop: connect, send a captured ClientHello (alternately OpenSSL's tunnel hello and "
      "Chromium's 2008-byte post-quantum h2 hello), read the backend's tag line and the echoed "
      "hello, echo 64 bytes, close. A wrong tag (wrong pool) is a failure. Latency is the whole "
      "exchange, connect to last byte.")
    d()
    d.table(["system", "conns/s", "p50 µs", "p99 µs", "p99.9 µs", "edge CPU µs/conn", "failed", "failures"],
            [[r["system"], fmt(r["conns_per_s"]), fmt(r["p50_us"]), fmt(r["p99_us"]),
              fmt(r["p999_us"]), fmt(r.get("edge_cpu_us_per_conn"), 1), fmt(r["failed"]),
              json.dumps(r["failures"]) if r["failures"] else ""]
             for rs in g.values() for r in rs])
    ratios_line(d, "connections/s", g, "conns_per_s", "≥ 1.25 × HAProxy")
    ratios_line(d, "p99 latency", g, "p99_us", "≤ 0.8 × HAProxy")
    ratios_line(d, "edge CPU per connection (user + system; lower is better)", g,
                "edge_cpu_us_per_conn", "none set; the steadiest figure here")
    d()

    g = by_system(rows, "throughput")
    d("## throughput")
    d()
    d("K streams, each sends N bytes through the edge to the tunnel backend and reads them back "
      "(the echo runs both ways at once). Gbit/s is payload received back by the client. "
      "sluice splices bulk transfers by default; HAProxy does only when configured to, so it "
      "runs twice here: as configured for every scenario (`haproxy`), and with "
      "`option splice-request` and `option splice-response` (`haproxy-splice`; "
      "`option splice-auto` did not engage on this traffic).")
    d()
    d.table(["system", "streams", "MiB per stream", "Gbit/s", "edge CPU s/GiB", "failed streams"],
            [[r["system"], fmt(r["streams"]), fmt(r["bytes_per_stream"] // (1 << 20)),
              fmt(r["gbit_per_s"], 2), fmt(r.get("edge_cpu_s_per_gib"), 3),
              fmt(r["failed_streams"])] for rs in g.values() for r in rs])
    ratios_line(d, "throughput", g, "gbit_per_s", "≥ 1.3 × HAProxy")
    ratios_line(d, "edge CPU per GiB relayed (lower is better)", g, "edge_cpu_s_per_gib",
                "none set")
    d()

    g = by_system(rows, "idle")
    d("## idle")
    d()
    d("N tunnel connections opened through the edge (client sources spread over 127.0.0.2–254), "
      "each with a hello and the backend's answer, held idle, then each checked alive with a "
      "one-byte echo. Memory is the RSS of all the edge's processes minus the RSS before, "
      "divided by N, in a freshly started edge, read twice: 2 s after all are open "
      "(\"bytes/conn at open\") and at the end of the hold, when they have been idle for it "
      "(\"bytes/conn idle\", the figure compared). sluice parks connections idle for 5 s "
      "(`park_idle_after`), so only the second shows parked tunnels.")
    d()
    d.table(["system", "connections", "opened", "held s", "lost", "processes", "RSS before KiB",
             "RSS at open KiB", "RSS idle KiB", "bytes/conn at open", "bytes/conn idle"],
            [[r["system"], fmt(r["connections"]), fmt(r["opened"]), fmt(r["hold_s"], 0),
              fmt(r["lost"]), fmt(r["processes"]), fmt(r["rss_before_kib"]),
              fmt(r.get("rss_after_open_kib")), fmt(r["rss_after_kib"]),
              fmt(r.get("bytes_per_conn_open")), fmt(r["bytes_per_conn"])]
             for rs in g.values() for r in rs])
    ratios_line(d, "bytes per idle connection", g, "bytes_per_conn", "≤ 1.0 KiB")
    d()

    g = by_system(rows, "reload")
    d("## reload under load")
    d()
    d("connrate runs while the config is rewritten every 100 ms (the client pool flips between "
      "one and two backends; the new file is renamed into place), with idle tunnels opened "
      "before and checked with an echo after. sluice reloads by itself (its file watcher); "
      "HAProxy gets `kill -USR2` to its master (master-worker reload), nginx `kill -HUP` "
      "(`nginx -s reload`). Processes counts the edge's processes before and after: a reload "
      "that leaves old workers behind holding the tunnels shows here.")
    d()
    d.table(["system", "conns/s", "p99 µs", "failed", "failures", "reloads sent", "tunnels",
             "tunnels cut", "processes before → after", "RSS before → after KiB"],
            [[r["system"], fmt(r["conns_per_s"]), fmt(r["p99_us"]), fmt(r["failed"]),
              json.dumps(r["failures"]) if r["failures"] else "", fmt(r["reloads"]),
              fmt(r["tunnels"]), fmt(r["tunnels_cut"]),
              f"{fmt(r['processes_before'])} → {fmt(r['processes_after'])}",
              f"{fmt(r['rss_before_kib'])} → {fmt(r['rss_after_kib'])}"]
             for rs in g.values() for r in rs])
    d("- goal: 0 failed new connections, 0 cut tunnels, no extra processes, RSS flat.")
    d()

    if micro and os.path.isdir(micro):
        d("## micro-benchmarks (criterion)")
        d()
        d("`cargo bench -p sluice-bench --bench core -- --warm-up-time 1 --measurement-time 2`; "
          "median time per call.")
        d()
        found = []
        for dirpath, _, files in os.walk(micro):
            if "estimates.json" in files and dirpath.endswith(os.sep + "new"):
                name = os.path.relpath(os.path.dirname(dirpath), micro)
                if name.startswith("report"):
                    continue
                est = json.load(open(os.path.join(dirpath, "estimates.json")))
                found.append((name, est["median"]["point_estimate"]))
        d.table(["benchmark", "median"],
                [[f"`{n}`", f"{ns:,.1f} ns" if ns < 10_000 else f"{ns / 1000:,.2f} µs"]
                 for n, ns in sorted(found)])

    d("## Commands")
    d()
    d("Each line is one measurement, as `bench/run.sh` ran it (`$RUN` is its scratch directory "
      "holding the rendered configs).")
    d()
    d("```")
    for c in commands:
        d(c)
    d("```")
    d()
    findings = os.path.join(HERE, "findings.md")
    if os.path.exists(findings):
        d(open(findings).read().rstrip())
        d()
    print("\n".join(d.lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
