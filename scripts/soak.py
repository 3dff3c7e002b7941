#!/usr/bin/env python
"""Soak test: publishers and consumers with random disconnects.

Publishers send persistent messages with unique ids under publisher
confirms; consumers ack. Both drop their connections at random and
reconnect. At the end publishing stops, consumers drain the queue, and the
script reports messages lost (confirmed but never consumed: must be 0),
duplicates (consumed more than once, expected after consumer disconnects),
the broker's RSS over time and end-to-end latency percentiles.

    python scripts/soak.py --serve --seconds 120           # starts `roost serve`
    python scripts/soak.py --url amqp://guest:guest@127.0.0.1:5672/ --pid $(pidof beam.smp)

Not part of the test suite (it runs for minutes).
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import threading
import time
import uuid
from collections import Counter

import pika
import pika.exceptions

QUEUE = "soak"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Soak:
    def __init__(
        self, url: str, disconnect_prob: float, size: int, consumer_delay: float = 0.0
    ) -> None:
        self.params = pika.URLParameters(url)
        self.consumer_delay = consumer_delay
        self.disconnect_prob = disconnect_prob
        self.body = b"x" * size
        self.lock = threading.Lock()
        self.confirmed: set[str] = set()
        self.consumed: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.stop_publishing = threading.Event()
        self.stop_consuming = threading.Event()
        self.disconnects = 0
        self.errors: Counter[str] = Counter()
        self.prefix = uuid.uuid4().hex[:8]
        self.ids = itertools.count()

    def setup(self) -> None:
        conn = pika.BlockingConnection(self.params)
        ch = conn.channel()
        ch.queue_declare(QUEUE, durable=True)
        ch.queue_purge(QUEUE)
        conn.close()

    def publisher(self, seed: int) -> None:
        rnd = random.Random(seed)
        while not self.stop_publishing.is_set():
            try:
                conn = pika.BlockingConnection(self.params)
                ch = conn.channel()
                ch.confirm_delivery()
                while not self.stop_publishing.is_set():
                    mid = f"{self.prefix}-{next(self.ids)}"
                    props = pika.BasicProperties(
                        delivery_mode=2,
                        message_id=mid,
                        timestamp=0,
                        headers={"t": repr(time.time())},
                    )
                    ch.basic_publish("", QUEUE, self.body, props, mandatory=True)
                    # basic_publish returned: the broker confirmed it.
                    with self.lock:
                        self.confirmed.add(mid)
                    if rnd.random() < self.disconnect_prob:
                        self.disconnects += 1
                        break
                conn.close()
            except pika.exceptions.AMQPError as exc:
                self.errors[f"publisher: {type(exc).__name__}"] += 1
                time.sleep(0.05)

    def consumer(self, seed: int) -> None:
        rnd = random.Random(seed)
        while not self.stop_consuming.is_set():
            try:
                conn = pika.BlockingConnection(self.params)
                ch = conn.channel()
                ch.basic_qos(prefetch_count=rnd.choice([1, 10, 100]))
                vanish = False
                for method, props, _body in ch.consume(QUEUE, inactivity_timeout=0.2):
                    if self.stop_consuming.is_set():
                        break
                    if method is None:
                        continue
                    now = time.time()
                    with self.lock:
                        self.consumed[props.message_id] += 1
                        if not method.redelivered:
                            self.latencies.append(now - float(props.headers["t"]))
                    if rnd.random() < self.disconnect_prob:
                        # Vanish without acking: the broker must requeue.
                        self.disconnects += 1
                        vanish = True
                        break
                    ch.basic_ack(method.delivery_tag)
                    if self.consumer_delay and not self.stop_publishing.is_set():
                        time.sleep(self.consumer_delay)  # let the queue grow
                if vanish:
                    conn._impl._transport._sock.close()  # abrupt, no connection.close
                    continue
                conn.close()
            except (pika.exceptions.AMQPError, OSError) as exc:
                self.errors[f"consumer: {type(exc).__name__}"] += 1
                time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    ap.add_argument("--pid", type=int, help="broker pid whose RSS to sample")
    ap.add_argument("--serve", action="store_true", help="start `roost serve` and soak it")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--consumers", type=int, default=4)
    ap.add_argument("--size", type=int, default=256, help="message body bytes")
    ap.add_argument("--disconnect", type=float, default=0.002, help="per-message probability")
    ap.add_argument(
        "--consumer-delay",
        type=float,
        default=0.0,
        help="seconds each consumer sleeps per message while publishing lasts "
        "(builds a deep queue: with --serve-args '--memory-high-watermark 80MB' "
        "it soaks the memory alarm)",
    )
    ap.add_argument("--serve-args", default="", help="extra `roost serve` options (--serve)")
    ap.add_argument("--drain-timeout", type=float, default=60.0)
    args = ap.parse_args()

    proc = None
    url, pid = args.url, args.pid
    if args.serve:
        from roost.testing import RoostProcess

        proc = RoostProcess(None, "--http-port", "-1", *args.serve_args.split()).start()
        assert proc.proc is not None
        url, pid = proc.url, proc.proc.pid
    try:
        soak = Soak(url, args.disconnect, args.size, args.consumer_delay)
        soak.setup()
        threads = [
            threading.Thread(target=soak.publisher, args=(i,), daemon=True)
            for i in range(args.publishers)
        ]
        consumers = [
            threading.Thread(target=soak.consumer, args=(1000 + i,), daemon=True)
            for i in range(args.consumers)
        ]
        for t in threads + consumers:
            t.start()
        rss: list[tuple[float, float]] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            if pid:
                rss.append((time.monotonic() - t0, rss_mib(pid)))
            time.sleep(min(10.0, args.seconds / 20))
        soak.stop_publishing.set()
        for t in threads:
            t.join(30)
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline:
            with soak.lock:
                if soak.confirmed <= soak.consumed.keys():
                    break
            time.sleep(0.2)
        soak.stop_consuming.set()
        for t in consumers:
            t.join(10)
        if pid:
            rss.append((time.monotonic() - t0, rss_mib(pid)))

        lost = soak.confirmed - soak.consumed.keys()
        dups = sum(n - 1 for n in soak.consumed.values() if n > 1)
        lat = sorted(soak.latencies)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

        print(
            f"duration: {args.seconds:.0f}s, "
            f"{args.publishers} publishers, {args.consumers} consumers"
        )
        print(f"confirmed: {len(soak.confirmed)} ({len(soak.confirmed) / args.seconds:.0f}/s)")
        print(f"consumed (distinct): {len(soak.consumed)}")
        print(f"LOST: {len(lost)}")
        print(f"duplicates: {dups}")
        print(f"random disconnects: {soak.disconnects}; errors: {dict(soak.errors)}")
        if lat:
            print(
                f"latency ms: p50 {pct(0.5):.1f}  p90 {pct(0.9):.1f}  p99 {pct(0.99):.1f}  "
                f"p99.9 {pct(0.999):.1f}  max {lat[-1] * 1000:.1f}  "
                f"(mean {statistics.fmean(lat) * 1000:.1f})"
            )
        if rss:
            print("RSS MiB over time: " + ", ".join(f"{t:.0f}s={m:.1f}" for t, m in rss))
        if lost:
            raise SystemExit(1)
    finally:
        if proc is not None:
            proc.close()


if __name__ == "__main__":
    main()
