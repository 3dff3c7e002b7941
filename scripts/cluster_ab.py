"""A/B benchmark of the cluster message path through AMQP: each run starts a
throwaway PostgreSQL and ``--nodes`` roost nodes from one source tree, runs
one workload with ``amqp_bench.py``'s client, and stops everything; runs
alternate between the trees, so a shared machine's drift hits both alike.

    python scripts/cluster_ab.py --tree new=src --tree old=/tmp/old/src \\
        --workload consume --nodes 3 --runs 3

Workloads (64-byte persistent messages into the durable queue ``bench``):

- ``consume``: publish ``-n`` with confirms (1,000 in flight) on the first
  node, then drain them with acks (prefetch 200) on ``--consume-node``;
- ``consume-all``: the same, drained by one consumer on every node at once;
- ``e2e``: publisher (first node) and consumer (``--consume-node``) at once,
  the publisher at ``--rate`` msg/s; latency percentiles from the body's
  timestamp.

Prints one JSON line per run and a summary of medians per tree.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from roost.cluster.devdb import ThrowawayPostgres

BENCH = Path(os.environ.get("AMQP_BENCH", "/work/shared/bench/amqp_bench.py"))


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("amqp_bench", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"node on port {port} did not start")


def start_nodes(
    src: str, url: str, n: int, base: Path, env_extra: dict[str, str]
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    env = dict(os.environ, PYTHONPATH=src, **env_extra)
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    for i in range(n):
        port = free_port()
        data = base / f"node{i + 1}"
        data.mkdir(mode=0o700)
        cmd = [
            sys.executable,
            "-m",
            "roost",
            "serve",
            "--cluster",
            url,
            "--node-name",
            f"node{i + 1}",
            "--port",
            str(port),
            "--http-port",
            str(free_port()),
            "--data-dir",
            str(data),
        ]
        log = open(base / f"node{i + 1}.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        ports.append(port)
    for port in ports:
        wait_port(port)
    return procs, ports


def stop_nodes(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def bench_args(bench: ModuleType, url: str, **kw: Any) -> argparse.Namespace:
    ns = argparse.Namespace(
        url=url,
        queue="bench",
        queue_args="",
        messages=100_000,
        size=64,
        persistent=True,
        confirm=True,
        inflight=1000,
        prefetch=200,
        no_ack=False,
        batch=100,
        rate=0.0,
    )
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def cpu_seconds(pids: list[int], children_of: int | None) -> dict[str, float]:
    """CPU time used so far by the nodes, and by PostgreSQL (the postmaster's
    children)."""
    tick = os.sysconf("SC_CLK_TCK")

    def used(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick

    out = {"nodes_cpu_s": sum(used(p) for p in pids), "bench_cpu_s": used(os.getpid())}
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    out["machine_idle_s"] = (cpu[3] + cpu[4]) / tick
    if children_of is not None:
        pg = used(children_of)
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == children_of:
                    pg += used(int(d.name))
        out["pg_cpu_s"] = pg
    return out


def start_profilers(where: str | None, pids: list[int]) -> list[subprocess.Popen[bytes]]:
    """py-spy on every node (``--profile DIR``: collapsed stacks per node)."""
    if not where:
        return []
    spy = Path(sys.executable).with_name("py-spy")
    spies = [
        subprocess.Popen(
            [
                str(spy),
                "record",
                "--format",
                "raw",
                "-r",
                "200",
                "-o",
                f"{where}/node{i}.txt",
                "-p",
                str(pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, pid in enumerate(pids)
    ]
    time.sleep(1.0)
    return spies


def stop_profilers(spies: list[subprocess.Popen[bytes]]) -> None:
    for s in spies:
        s.send_signal(signal.SIGINT)
    for s in spies:
        s.wait(30)


async def consume_share(bench: ModuleType, url: str, done: list[int], total: int) -> int:
    """One of several competing consumers (prefetch 200, acks every 100):
    counts its deliveries into ``done[0]`` until all ``total`` arrived."""
    c = await bench.connect(url)
    c.send(bench.C.Basic.Qos(prefetch_count=200), 1)
    await c.expect(bench.C.Basic.QosOk)
    c.send(bench.C.Basic.Consume(queue="bench", consumer_tag="share"), 1)
    await c.expect(bench.C.Basic.ConsumeOk)
    got = unacked = last_tag = 0
    buf = c.buf
    while done[0] < total:
        i, n = 0, len(buf)
        while n - i >= 8:
            size = int.from_bytes(buf[i + 3 : i + 7], "big")
            if n - i < size + 8:
                break
            if buf[i] == 1 and buf[i + 7 : i + 11] == b"\x00\x3c\x00\x3c":  # basic.deliver
                ctl = buf[i + 11]
                last_tag = int.from_bytes(buf[i + 12 + ctl : i + 20 + ctl], "big")
                got += 1
                unacked += 1
                done[0] += 1
            i += size + 8
        del buf[:i]
        if unacked >= 100 or (done[0] >= total and unacked):
            c.send(bench.C.Basic.Ack(delivery_tag=last_tag, multiple=True), 1)
            unacked = 0
        if done[0] >= total:
            break
        try:
            data = await asyncio.wait_for(c.r.read(1 << 20), 0.2)
        except TimeoutError:
            continue  # another consumer may have taken the last ones
        if not data:
            raise ConnectionError("connection closed by broker")
        buf += data
    await c.w.drain()
    c.w.close()
    return got


async def run_workload(
    bench: ModuleType, ports: list[int], pids: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    pub_url = f"amqp://guest:guest@127.0.0.1:{ports[0]}/"
    con_url = f"amqp://guest:guest@127.0.0.1:{ports[args.consume_node]}/"
    out: dict[str, Any] = {}
    if args.workload == "consume":
        pa = bench_args(bench, pub_url, messages=args.messages)
        pc = await bench.connect(pub_url)
        await bench.declare(pc, "bench", pa)
        out.update(await bench.run_publish(pa, c=pc))
        ca = bench_args(bench, con_url, messages=args.messages)
        spies = start_profilers(args.profile, pids)
        before = cpu_seconds(pids, args.pg_pid)
        out.update(await bench.run_consume(ca, args.messages))
        after = cpu_seconds(pids, args.pg_pid)
        stop_profilers(spies)
        for k, v in after.items():
            out[k] = round(v - before[k], 2)
    elif args.workload == "consume-all":
        # Consumers on every node at once, competing for one queue.
        pa = bench_args(bench, pub_url, messages=args.messages)
        pc = await bench.connect(pub_url)
        await bench.declare(pc, "bench", pa)
        out.update(await bench.run_publish(pa, c=pc))
        done = [0]
        t0 = time.perf_counter()
        shares = await asyncio.gather(
            *(
                consume_share(bench, f"amqp://guest:guest@127.0.0.1:{p}/", done, args.messages)
                for p in ports
            )
        )
        out["consume_rate"] = args.messages / (time.perf_counter() - t0)
        out["shares"] = shares
    else:
        ca = bench_args(bench, con_url, messages=args.messages, rate=args.rate)
        cc = await bench.connect(con_url)
        await bench.declare(cc, "bench", ca)
        pa = bench_args(bench, pub_url, messages=args.messages, rate=args.rate, batch=1)
        pc = await bench.connect(pub_url)
        lat: list[int] = []
        cons = asyncio.ensure_future(bench.run_consume(ca, args.messages, lat=lat, c=cc))
        out.update(await bench.run_publish(pa, c=pc))
        out.update(await cons)
        # The first second warms up (claims, connections, the JIT-less
        # caches): latency from the rest.
        steady = lat[int(args.rate) :] if len(lat) > 2 * args.rate else lat
        for p in (50, 90, 99):
            out[f"lat_p{p}_ms"] = round(bench.pct(steady, p) / 1e6, 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tree", action="append", required=True, help="name=path/to/src[;VAR=value...]"
    )
    ap.add_argument("--workload", choices=["consume", "consume-all", "e2e"], default="consume")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--consume-node", type=int, default=0, help="index of the consumer's node")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("-n", "--messages", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--env", action="append", default=[], help="VAR=value for the nodes")
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument(
        "--profile", help="directory for py-spy's collapsed stacks of the consume phase"
    )
    args = ap.parse_args()
    trees = [t.split("=", 1) for t in args.tree]
    tree_env = {}
    for t in trees:
        # name=path;VAR=value;...: environment for that tree's nodes only.
        path, *extra = t[1].split(";")
        t[1] = path
        tree_env[t[0]] = dict(e.split("=", 1) for e in extra)
    env_extra = dict(e.split("=", 1) for e in args.env)
    bench = load_bench()
    key = "lat_p50_ms" if args.workload == "e2e" else "consume_rate"
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    for run in range(args.runs):
        for name, src in trees if run % 2 == 0 else list(reversed(trees)):
            base = Path(tempfile.mkdtemp(prefix="roost-ab-"))
            procs: list[subprocess.Popen[bytes]] = []
            try:
                with ThrowawayPostgres() as pg:
                    args.pg_pid = pg.proc.pid if pg.proc else None
                    procs, ports = start_nodes(
                        str(Path(src).resolve()),
                        pg.url,
                        args.nodes,
                        base,
                        {**env_extra, **tree_env[name]},
                    )
                    out = asyncio.run(run_workload(bench, ports, [p.pid for p in procs], args))
                    stop_nodes(procs)
            finally:
                stop_nodes(procs)
                if args.keep_logs:
                    print(f"logs: {base}", file=sys.stderr)
                else:
                    shutil.rmtree(base, ignore_errors=True)
            out = {"tree": name, "run": run, **{k: _round(v) for k, v in out.items()}}
            results[name].append(out)
            print(json.dumps(out), flush=True)
    for name, runs in results.items():
        summary = {
            k: round(statistics.median(r[k] for r in runs), 2)
            for k in runs[0]
            if k.endswith(("_rate", "_ms"))
        }
        print(json.dumps({"tree": name, "median_of": len(runs), key: summary.get(key), **summary}))
    return 0


def _round(v: Any) -> Any:
    return round(v, 2) if isinstance(v, float) else v


if __name__ == "__main__":
    sys.exit(main())
