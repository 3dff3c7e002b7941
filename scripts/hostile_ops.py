#!/usr/bin/env python
"""Time the single requests that used to freeze roost's event loop
(issue 12, item 4): binding, unbinding and deleting with many bindings,
routing through crafted topic patterns, catastrophic regex filters and
filtered listings of many queues. Each operation goes to a real broker
over AMQP (raw pipelined frames, and pika for one-at-a-time requests) or
HTTP, and its wall time is printed.

    python scripts/hostile_ops.py                     # starts `roost serve`
    python scripts/hostile_ops.py --src ../main/src   # another checkout's roost
    python scripts/hostile_ops.py --port 5672 --http-port 15672   # a running broker

A broker this script did not start gets its queues and exchanges deleted
again, but is left with whatever else the operations did to it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

import pika
from pamqp import commands as C
from pamqp import frame as pframe

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


class Client:
    """A bare-socket AMQP client: enough to pipeline methods on channel 1."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=600)
        self.buf = b""
        self.sock.sendall(PROTOCOL_HEADER)
        self.expect(C.Connection.Start)
        self.send(
            C.Connection.StartOk(
                client_properties={}, mechanism="PLAIN", response="\0guest\0guest"
            ),
            channel=0,
        )
        tune = self.expect(C.Connection.Tune)
        self.send(C.Connection.TuneOk(tune.channel_max, tune.frame_max, 0), channel=0)
        self.send(C.Connection.Open(virtual_host="/"), channel=0)
        self.expect(C.Connection.OpenOk)
        self.send(C.Channel.Open())
        self.expect(C.Channel.OpenOk)

    def send(self, method: Any, channel: int = 1) -> None:
        self.sock.sendall(pframe.marshal(method, channel))

    def send_all(self, methods: Iterable[Any]) -> None:
        batch: list[bytes] = []
        for m in methods:
            batch.append(pframe.marshal(m, 1))
            if len(batch) == 1000:
                self.sock.sendall(b"".join(batch))
                batch.clear()
        self.sock.sendall(b"".join(batch))

    def publish(self, exchange: str, routing_key: str) -> None:
        from pamqp.header import ContentHeader

        self.sock.sendall(
            pframe.marshal(C.Basic.Publish(exchange=exchange, routing_key=routing_key), 1)
            + pframe.marshal(ContentHeader(0, 0, C.Basic.Properties()), 1)
        )

    def expect(self, cls: type) -> Any:
        while True:
            if len(self.buf) >= 7:
                size = struct.unpack(">I", self.buf[3:7])[0]
                if len(self.buf) >= size + 8:
                    n, _, fr = pframe.unmarshal(self.buf[: size + 8])
                    self.buf = self.buf[n:]
                    if type(fr).__name__ == "Heartbeat":
                        continue
                    if not isinstance(fr, cls):
                        raise RuntimeError(f"expected {cls.__name__}, got {fr!r}")
                    return fr
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("closed by broker")
            self.buf += data

    def sync(self, queue: str) -> None:
        self.send(C.Queue.Declare(queue=queue, passive=True))
        self.expect(C.Queue.DeclareOk)

    def close(self) -> None:
        self.sock.close()


class Http:
    def __init__(self, host: str, port: int) -> None:
        self.base = f"http://{host}:{port}"
        self.auth = "Basic " + base64.b64encode(b"guest:guest").decode()

    def __call__(self, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, method=method, data=data)
        req.add_header("Authorization", self.auth)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        return status, json.loads(raw) if raw else None


def timed(label: str, fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    took = time.monotonic() - start
    print(f"{label:<62} {took * 1000:>10.1f} ms", flush=True)
    return took


def queue_with_bindings(c: Client, n: int) -> None:
    c.send(C.Queue.Declare(queue="hostile-direct"))
    c.expect(C.Queue.DeclareOk)

    def bind() -> None:
        c.send_all(
            C.Queue.Bind(
                queue="hostile-direct", exchange="amq.direct", routing_key=f"k.{i}", nowait=True
            )
            for i in range(n)
        )
        c.sync("hostile-direct")

    def delete() -> None:
        c.send(C.Queue.Delete(queue="hostile-direct"))
        c.expect(C.Queue.DeleteOk)

    timed(f"bind {n:,} direct bindings to one queue (pipelined)", bind)
    timed(f"delete that queue with its {n:,} bindings", delete)


def topic_bindings(c: Client, n: int) -> None:
    c.send(C.Queue.Declare(queue="hostile-topic"))
    c.expect(C.Queue.DeclareOk)
    keys = [f"region.{i % 50}.*.#.item{i}" for i in range(n)]

    def bind() -> None:
        c.send_all(
            C.Queue.Bind(queue="hostile-topic", exchange="amq.topic", routing_key=k, nowait=True)
            for k in keys
        )
        c.sync("hostile-topic")

    def unbind() -> None:
        c.send_all(
            C.Queue.Unbind(queue="hostile-topic", exchange="amq.topic", routing_key=k) for k in keys
        )
        for _ in keys:
            c.expect(C.Queue.UnbindOk)

    timed(f"bind {n:,} topic bindings (pipelined)", bind)
    timed(f"unbind those {n:,} topic bindings (pipelined)", unbind)
    c.send(C.Queue.Delete(queue="hostile-topic"))
    c.expect(C.Queue.DeleteOk)


def crafted_patterns(c: Client, n: int, publishes: int) -> None:
    c.send(C.Exchange.Declare(exchange="hostile-crafted", exchange_type="topic"))
    c.expect(C.Exchange.DeclareOk)
    c.send(C.Queue.Declare(queue="hostile-crafted"))
    c.expect(C.Queue.DeclareOk)
    c.send_all(
        C.Queue.Bind(
            queue="hostile-crafted",
            exchange="hostile-crafted",
            routing_key="#." + "a." * 60 + f"b{i}",
            nowait=True,
        )
        for i in range(n)
    )
    c.sync("hostile-crafted")

    def route() -> None:
        for j in range(publishes):
            c.publish("hostile-crafted", "a." * 120 + f"b{j}x")
        c.sync("hostile-crafted")

    timed(f"{publishes} publishes through {n:,} crafted '#.a.a...' patterns", route)
    c.send(C.Queue.Delete(queue="hostile-crafted"))
    c.expect(C.Queue.DeleteOk)
    c.send(C.Exchange.Delete(exchange="hostile-crafted"))
    c.expect(C.Exchange.DeleteOk)


def durable_bindings_one_by_one(host: str, port: int, n: int) -> None:
    """Each bind-ok of a durable binding waits for definitions.json."""
    conn = pika.BlockingConnection(pika.ConnectionParameters(host=host, port=port))
    ch = conn.channel()
    ch.exchange_declare("hostile-durable", "topic", durable=True)
    ch.queue_declare("hostile-durable", durable=True)

    def bind() -> None:
        for i in range(n):
            ch.queue_bind("hostile-durable", "hostile-durable", f"d.{i}.#")

    timed(f"bind {n:,} durable topic bindings one at a time (pika)", bind)
    timed("delete that durable queue", lambda: ch.queue_delete("hostile-durable"))
    ch.exchange_delete("hostile-durable")
    conn.close()


def regex_filter(http: Http, letters: int) -> None:
    name = "a" * letters + "!"
    http(f"/api/queues/%2F/{name}", "PUT", {})
    q = urllib.parse.urlencode({"name": "(a+)+$", "use_regex": "true"})
    timed(
        f"GET /api/queues?name=(a+)+$ with a {letters + 1}-char queue name",
        lambda: http(f"/api/queues?{q}"),
    )
    http(f"/api/queues/%2F/{name}", "DELETE")


def listings(c: Client, http: Http, n: int) -> None:
    c.send_all(C.Queue.Declare(queue=f"hostile-q-{i}", nowait=True) for i in range(n))
    c.sync("hostile-q-0")
    page = urllib.parse.urlencode({"name": f"hostile-q-{n - 1}", "page": "1", "page_size": "100"})
    regex = urllib.parse.urlencode({"name": "-1[0-9]{3}$", "use_regex": "true", "page": "3"})
    timed(
        f"GET /api/queues?page=1&name=... among {n:,} queues", lambda: http(f"/api/queues?{page}")
    )
    timed(
        f"GET /api/queues?page=3&use_regex=true among {n:,} queues",
        lambda: http(f"/api/queues?{regex}"),
    )
    timed(f"GET /api/queues (all {n:,})", lambda: http("/api/queues"))
    c.send_all(C.Queue.Delete(queue=f"hostile-q-{i}", nowait=True) for i in range(n))
    c.send(C.Basic.Qos())
    c.expect(C.Basic.QosOk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, help="a running broker's AMQP port")
    ap.add_argument("--http-port", type=int, help="a running broker's management port")
    ap.add_argument("--src", help="run `roost serve` from this source tree (PYTHONPATH)")
    ap.add_argument("--skip-slow", action="store_true", help="skip the durable one-by-one binds")
    ap.add_argument("--regex-letters", type=int, default=24)
    args = ap.parse_args()

    proc = None
    if args.port is None:
        from roost.testing import RoostProcess

        env = dict(os.environ)
        if args.src:
            env["PYTHONPATH"] = os.path.abspath(args.src)
        proc = RoostProcess(None, env=env).start()
        host, port, http_port = proc.host, proc.port, proc.http_port
    else:
        host, port, http_port = args.host, args.port, args.http_port
    try:
        c = Client(host, port)
        queue_with_bindings(c, 20_000)
        topic_bindings(c, 10_000)
        crafted_patterns(c, 1_500, 100)
        if http_port:
            http = Http(host, http_port)
            regex_filter(http, args.regex_letters)
            listings(c, http, 20_000)
        if not args.skip_slow:
            durable_bindings_one_by_one(host, port, 2_000)
        c.close()
    finally:
        if proc is not None:
            proc.close()


if __name__ == "__main__":
    main()
