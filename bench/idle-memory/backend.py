import asyncio, sys
async def h(r, w):
    w.write(b"backend\n"); await w.drain()
    try:
        while await r.read(65536): pass
    except Exception: pass
    w.close()
async def main():
    s = await asyncio.start_server(h, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    await s.serve_forever()
asyncio.run(main())
