#!/usr/bin/env python
"""Memory per idle AMQP connection: open N connections (handshake + one
channel each), let them settle, and report the broker's RSS delta / N.

    python scripts/measure_connections.py --roost          # starts `roost serve`
    python scripts/measure_connections.py --port 5672 --rabbitmq   # beam.smp RSS
    python scripts/measure_connections.py --port 5672 --pid 1234
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import struct
import time

from pamqp import commands as C
from pamqp import frame as pframe


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def find_pid(name: str) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == name:
                        return int(entry)
            except OSError:
                continue
    raise SystemExit(f"no process named {name}")


async def read_frame(reader: asyncio.StreamReader) -> object:
    head = await reader.readexactly(7)
    size = struct.unpack(">I", head[3:7])[0]
    rest = await reader.readexactly(size + 1)
    return pframe.unmarshal(head + rest)[2]


async def expect(reader: asyncio.StreamReader, cls: type) -> object:
    while True:
        fr = await read_frame(reader)
        if isinstance(fr, cls):
            return fr


async def open_idle(host: str, port: int) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"AMQP\x00\x00\x09\x01")
    await expect(reader, C.Connection.Start)
    writer.write(
        pframe.marshal(C.Connection.StartOk(mechanism="PLAIN", response="\0guest\0guest"), 0)
    )
    tune = await expect(reader, C.Connection.Tune)
    assert isinstance(tune, C.Connection.Tune)
    writer.write(
        pframe.marshal(
            C.Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max), 0
        )
    )
    writer.write(pframe.marshal(C.Connection.Open(virtual_host="/"), 0))
    await expect(reader, C.Connection.OpenOk)
    writer.write(pframe.marshal(C.Channel.Open(), 1))
    await expect(reader, C.Channel.OpenOk)
    return writer


async def measure(host: str, port: int, pid: int, n: int, settle: float) -> tuple[int, int]:
    await asyncio.sleep(settle)
    before = rss_kib(pid)
    sem = asyncio.Semaphore(100)

    async def one() -> asyncio.StreamWriter:
        async with sem:
            return await open_idle(host, port)

    writers = await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.sleep(settle)
    after = rss_kib(pid)
    for w in writers:
        w.close()
    return before, after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5672)
    ap.add_argument("--pid", type=int, help="broker pid whose RSS to read")
    ap.add_argument("--rabbitmq", action="store_true", help="read beam.smp's RSS")
    ap.add_argument("--roost", action="store_true", help="start `roost serve` and measure it")
    ap.add_argument("-n", "--connections", type=int, default=1000)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait before reading RSS")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 2 * args.connections + 1024)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    proc = None
    if args.roost:
        from roost.testing import RoostProcess

        proc = RoostProcess(None, "--http-port", "-1").start()
        assert proc.proc is not None
        host, port, pid = proc.host, proc.port, proc.proc.pid
        name = "roost"
    else:
        host, port = args.host, args.port
        pid = args.pid or find_pid("beam.smp")
        name = "rabbitmq" if args.rabbitmq or not args.pid else f"pid {pid}"
    try:
        t0 = time.monotonic()
        before, after = asyncio.run(measure(host, port, pid, args.connections, args.settle))
        per = (after - before) / args.connections
        print(
            f"{name}: {args.connections} idle connections, RSS {before / 1024:.1f} MiB -> "
            f"{after / 1024:.1f} MiB, {per:.1f} KiB per connection "
            f"({time.monotonic() - t0:.1f}s)"
        )
    finally:
        if proc is not None:
            proc.close()


if __name__ == "__main__":
    main()
