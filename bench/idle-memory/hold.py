# Usage: hold.py NAME EDGE_PORT N PID[,PID...]
# Idle-connection memory: hold N relayed connections through an edge, report edge RSS delta.
import asyncio, sys, os, time
mode, edge_port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

HELLO = open(os.path.join(os.path.dirname(__file__), "../../tests/fixtures/openssl-3.0-tunnel.bin"),"rb").read()
def rss(pids):
    t = 0
    for p in pids:
        for l in open(f"/proc/{p}/status"):
            if l.startswith("VmRSS:"): t += int(l.split()[1])
    return t
async def main():
    pids = [int(x) for x in sys.argv[4].split(",")]
    before = rss(pids)
    conns = []
    srcs = [f"127.0.0.{i}" for i in range(2, 250)]
    for i in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", edge_port, local_addr=(srcs[i % len(srcs)], 0))
        w.write(HELLO); await w.drain()
        conns.append((r, w))
        if i % 500 == 499: await asyncio.sleep(0)
    ok = 0
    for r, w in conns:
        line = await asyncio.wait_for(r.readline(), 10)
        if line.startswith(b"backend"): ok += 1
    await asyncio.sleep(2)
    after = rss(pids)
    print(f"{mode}: {ok}/{n} connections relayed; RSS before {before} KiB, after {after} KiB; "
          f"{(after-before)*1024/n:.0f} bytes per connection")
    for r, w in conns: w.close()
asyncio.run(main())
