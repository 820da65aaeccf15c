"""The "several edges" section of RESULTS.md, from `edges`' JSON lines (argv[1])."""
import json
import sys

rows = {r["scenario"]: r for r in (json.loads(l) for l in open(sys.argv[1]) if l.strip())}
need = ["visible_on_another_edge", "heartbeats_changed", "heartbeats_unchanged", "fresh_edge_lists"]
missing = [n for n in need if n not in rows]
if missing:
    sys.exit(f"several edges: missing {missing}")
if rows["heartbeats_changed"]["failed"] or rows["heartbeats_unchanged"]["failed"]:
    sys.exit("several edges: heartbeats failed")
v, c, u, f = (rows[n] for n in need)
print("\n## several edges (issue 20)\n")
print("Three etcd 3.4 members (data on tmpfs: what is measured is sluice and etcd's raft, not this")
print("machine's disk flushes) and three `sluice run` processes, all on these 2 cores.")
print("Goals: visible on every edge within 1 s p99; 0 raft proposals per unchanged heartbeat;")
print("< 512 bytes per record on an edge.\n")
print("| measure | figure |")
print("| --- | --- |")
print(f"| heartbeat on one edge → listed on another, p50 / p99 ({v['samples']} samples) | {v['p50_ms']:.1f} ms / {v['p99_ms']:.1f} ms |")
print(f"| heartbeats/s that change the agent (guarded puts), {c['workers']} clients over 3 edges | {c['per_second']:,.0f} |")
print(f"| heartbeats/s that repeat it (lease keep-alives) | {u['per_second']:,.0f} |")
print(f"| raft proposals per unchanged heartbeat | {u['proposals_per_heartbeat']:.4f} ({u['proposals']:.0f} in all) |")
print(f"| a fresh edge lists {f['agents']:,} agents x {f['resources']} resources: start to ready | {f['seconds_to_ready']:.2f} s |")
print(f"| its memory per record (RSS over an edge of an empty cluster) | {f['bytes_per_record']:.0f} B |")
