"""A fuzzing harness for roost's AMQP listener.

Each case opens a socket, optionally completes a valid handshake, then sends
hostile bytes (random, mutated or deliberately malformed frames) and reads
whatever comes back until the broker goes quiet or closes the socket. Every
``check_every`` cases, and at the end, a well-behaved pika client must still
publish and consume, and (for an in-process broker) the broker thread must
be alive and nothing may have been logged as an unhandled exception.

Run for a long time with::

    python -m tests.fuzz.harness --seconds 600 --seed 1
    python -m tests.fuzz.harness --seconds 600 --seed 1 --port 5673  # external broker
"""

from __future__ import annotations

import argparse
import logging
import random
import socket
import struct
import sys
import time
from collections.abc import Callable

import pika
from pamqp import commands as C
from pamqp import frame as pframe

from roost.amqp.wire import PROTOCOL_HEADER
from roost.testing import RoostBroker

Case = Callable[[random.Random, int], tuple[bool, bytes]]


# -- frame builders ----------------------------------------------------------


def raw_frame(ftype: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + bytes((end,))


def method(cls: int, meth: int, args: bytes, channel: int = 1) -> bytes:
    return raw_frame(1, channel, struct.pack(">HH", cls, meth) + args)


def shortstr(b: bytes) -> bytes:
    return bytes((len(b),)) + b


def nested_table(depth: int) -> bytes:
    """A field table nested ``depth`` levels deep, built without recursion."""
    inner = b""
    for _ in range(depth):
        inner = b"\x01a" + b"F" + struct.pack(">I", len(inner)) + inner
    return struct.pack(">I", len(inner)) + inner


def nested_array(depth: int) -> bytes:
    """A one-entry table holding an array nested ``depth`` levels deep."""
    inner = b""
    for _ in range(depth):
        inner = b"A" + struct.pack(">I", len(inner)) + inner
    entry = b"\x01a" + inner
    return struct.pack(">I", len(entry)) + entry


def huge_table(rng: random.Random, entries: int) -> bytes:
    body = b"".join(
        shortstr(f"k{i}".encode()) + b"S" + struct.pack(">I", 3) + b"abc" for i in range(entries)
    )
    return struct.pack(">I", len(body)) + body


def queue_declare(table: bytes, name: bytes = b"", channel: int = 1) -> bytes:
    return method(50, 10, b"\x00\x00" + shortstr(name) + b"\x00" + table, channel)


def publish(exchange: bytes, key: bytes, channel: int = 1) -> bytes:
    return method(60, 40, b"\x00\x00" + shortstr(exchange) + shortstr(key) + b"\x00", channel)


def content_header(props: bytes, body_size: int, channel: int = 1, cls: int = 60) -> bytes:
    return raw_frame(2, channel, struct.pack(">HHQ", cls, 0, body_size) + props, 0xCE)


def body(data: bytes, channel: int = 1) -> bytes:
    return raw_frame(3, channel, data)


def headers_props(table: bytes) -> bytes:
    return struct.pack(">H", 0x2000) + table


VALID_METHODS: list[object] = [
    C.Queue.Declare(queue="fuzz-q", auto_delete=True),
    C.Exchange.Declare(exchange="fuzz-x", exchange_type="topic", auto_delete=True),
    C.Queue.Bind(queue="fuzz-q", exchange="amq.topic", routing_key="a.#"),
    C.Basic.Qos(prefetch_count=5),
    C.Basic.Consume(queue="fuzz-q"),
    C.Basic.Get(queue="fuzz-q"),
    C.Basic.Publish(exchange="", routing_key="fuzz-q"),
    C.Basic.Ack(delivery_tag=1),
    C.Channel.Flow(active=False),
    C.Confirm.Select(),
    C.Tx.Select(),
]


def valid_frame(rng: random.Random) -> bytes:
    m = rng.choice(VALID_METHODS)
    return pframe.marshal(m, 1)  # type: ignore[arg-type]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b))]
        elif op == 2:
            b.insert(rng.randint(0, len(b)), rng.randrange(256))
        elif b:
            b = b[: rng.randrange(len(b))]
    return bytes(b)


# -- cases: each returns (handshake?, bytes to send after it) ----------------


def case_random_no_handshake(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    head = PROTOCOL_HEADER if rng.random() < 0.5 else mutate(rng, PROTOCOL_HEADER)
    return False, head + rng.randbytes(rng.randint(0, 200))


def case_random_after_header(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    return False, PROTOCOL_HEADER + rng.randbytes(rng.randint(1, 500))


def case_random_after_handshake(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    return True, rng.randbytes(rng.randint(1, 500))


def case_truncated(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    f = valid_frame(rng)
    return True, f[: rng.randrange(len(f))]


def case_wrong_size(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    f = bytearray(valid_frame(rng))
    struct.pack_into(">I", f, 3, max(0, len(f) - 8 + rng.choice([-3, -1, 1, 2, 50])))
    return True, bytes(f) + rng.randbytes(rng.randint(0, 60))


def case_wrong_frame_end(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    f = bytearray(valid_frame(rng))
    f[-1] = rng.choice([0, 0xCD, 0xFF, rng.randrange(256)]) if True else 0
    if f[-1] == 0xCE:
        f[-1] = 0
    return True, bytes(f)


def case_unknown_method(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    cls = rng.choice([0, 1, 999, 60, 50, 0xFFFF, rng.randrange(65536)])
    meth = rng.choice([0, 7, 999, 0xFFFF, rng.randrange(65536)])
    return True, method(cls, meth, rng.randbytes(rng.randint(0, 40)), rng.choice([0, 1]))


def case_unknown_frame_type(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    return True, raw_frame(rng.choice([0, 4, 7, 9, 255]), rng.randrange(3), rng.randbytes(5))


def case_huge_table(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    n = rng.choice([1000, 5000, 20000])
    return True, queue_declare(huge_table(rng, n), b"fuzz-huge")


def case_deep_table(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    depth = rng.choice([200, 1000, 5000, 10000])
    table = nested_table(depth) if rng.random() < 0.5 else nested_array(depth)
    return True, queue_declare(table, b"fuzz-deep")


def case_deep_headers(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    """Deep nesting inside a publish's headers property (read for headers
    exchanges, CC/BCC and dead-lettering)."""
    depth = rng.choice([200, 1000, 5000, 10000])
    table = nested_table(depth) if rng.random() < 0.5 else nested_array(depth)
    exchange = rng.choice([b"amq.headers", b"amq.match", b"", b"amq.direct"])
    return True, (
        method(20, 10, b"\x00")
        + publish(exchange, b"fuzz")
        + content_header(headers_props(table), 3)
        + body(b"abc")
    )


def case_bad_props(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    props = rng.randbytes(rng.randint(0, 80))
    if rng.random() < 0.5:
        props = struct.pack(">H", rng.randrange(65536)) + props
    exchange = rng.choice([b"amq.headers", b"", b"amq.fanout"])
    return True, (
        method(20, 10, b"\x00")
        + publish(exchange, b"fuzz")
        + content_header(props, 2)
        + body(b"hi")
    )


def case_invalid_utf8(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    bad = rng.choice([b"\xff\xfe", b"\xc3", b"a\xed\xa0\x80b", b"\x80" * 10])
    frames = [
        queue_declare(struct.pack(">I", 0), bad),
        method(40, 10, b"\x00\x00" + shortstr(bad) + shortstr(b"topic") + b"\x00\x00\x00\x00\x00"),
        publish(bad, b"k") + content_header(b"\x00\x00", 0),
        publish(b"", bad) + content_header(b"\x00\x00", 0),
        method(60, 20, b"\x00\x00" + shortstr(b"q") + shortstr(bad) + b"\x00\x00\x00\x00\x00"),
    ]
    return True, method(20, 10, b"\x00") + rng.choice(frames)


def case_content_out_of_order(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    opts = [
        body(b"xyz"),
        content_header(b"\x00\x00", 3),
        publish(b"", b"q") + body(b"abc"),
        publish(b"", b"q") + content_header(b"\x00\x00", 3) + content_header(b"\x00\x00", 3),
        publish(b"", b"q") + content_header(b"\x00\x00", 3) + body(b"abcdef"),
        publish(b"", b"q") + content_header(b"\x00\x00", 3) + publish(b"", b"q"),
        publish(b"", b"q") + content_header(b"\x00\x00", 3, channel=2) + body(b"abc"),
        publish(b"", b"q") + content_header(b"\x00\x00", 3, cls=50) + body(b"abc"),
        publish(b"", b"q") + raw_frame(8, 1, b""),
        publish(b"", b"q", channel=3) + content_header(b"\x00\x00", 1, channel=3) + body(b"a", 3),
    ]
    return True, method(20, 10, b"\x00") + rng.choice(opts)


def case_channel_flood(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    n = rng.choice([100, 2047, 2100])
    return True, b"".join(method(20, 10, b"\x00", ch) for ch in range(1, n + 1))


def case_oversized_frame(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    size = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, fm + 1, 1 << 24])
    ftype = rng.choice([1, 2, 3])
    return rng.random() < 0.8, (
        (PROTOCOL_HEADER if False else b"") + struct.pack(">BHI", ftype, 1, size) + b"\x00" * 64
    )


def case_mutated_sequence(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    seq = method(20, 10, b"\x00") + b"".join(valid_frame(rng) for _ in range(rng.randint(1, 6)))
    return True, mutate(rng, seq)


def case_mutated_handshake(rng: random.Random, fm: int) -> tuple[bool, bytes]:
    """Garbage in place of tune-ok/open (start-ok is left alone: a broken one
    counts as a failed login and would trip the login throttle)."""
    f = rng.choice(
        [
            pframe.marshal(C.Connection.TuneOk(2047, 131072, 0), 0),
            pframe.marshal(C.Connection.Open(virtual_host="/"), 0),
        ]
    )
    return False, mutate(rng, f)


CASES: list[Case] = [
    case_random_no_handshake,
    case_random_after_header,
    case_random_after_handshake,
    case_truncated,
    case_wrong_size,
    case_wrong_frame_end,
    case_unknown_method,
    case_unknown_frame_type,
    case_huge_table,
    case_deep_table,
    case_deep_headers,
    case_bad_props,
    case_invalid_utf8,
    case_content_out_of_order,
    case_channel_flood,
    case_oversized_frame,
    case_mutated_sequence,
    case_mutated_handshake,
]


# -- running -----------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Collects ERROR records from asyncio and roost."""

    def __init__(self, loggers: tuple[str, ...] = ("asyncio", "roost")) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.loggers = loggers

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(self.loggers):
            self.records.append(record)

    def crashes(self) -> list[str]:
        out = []
        for r in self.records:
            msg = r.getMessage()
            if r.exc_info or any(
                s in msg for s in ("Exception in callback", "Unhandled", "Fatal error", "Traceback")
            ):
                out.append(f"{r.name}: {msg} {r.exc_info[1]!r}" if r.exc_info else msg)
        return out


def _recv_frame(sock: socket.socket, buf: bytearray) -> tuple[int, object]:
    while True:
        if len(buf) >= 7:
            size = struct.unpack_from(">I", buf, 3)[0]
            if len(buf) >= size + 8:
                n, ch, fr = pframe.unmarshal(bytes(buf[: size + 8]))
                del buf[:n]
                return ch, fr
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        buf += data


def _handshake(sock: socket.socket) -> int:
    buf = bytearray()
    sock.sendall(PROTOCOL_HEADER)
    _recv_frame(sock, buf)  # start
    start_ok = C.Connection.StartOk(
        client_properties={}, mechanism="PLAIN", response="\0guest\0guest"
    )
    sock.sendall(pframe.marshal(start_ok, 0))
    _, tune = _recv_frame(sock, buf)
    assert isinstance(tune, C.Connection.Tune), tune
    sock.sendall(pframe.marshal(C.Connection.TuneOk(tune.channel_max, tune.frame_max, 0), 0))
    sock.sendall(pframe.marshal(C.Connection.Open(virtual_host="/"), 0))
    _, ok = _recv_frame(sock, buf)
    assert isinstance(ok, C.Connection.OpenOk), ok
    return int(tune.frame_max)


def run_case(port: int, handshake: bool, payload: bytes, idle: float = 0.03) -> bytes:
    """Send ``payload`` and return whatever the broker answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    got = bytearray()
    try:
        if handshake:
            _handshake(sock)
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            return bytes(got)
        sock.settimeout(idle)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
    finally:
        sock.close()
    return bytes(got)


def check_client(port: int, tag: str) -> None:
    """A well-behaved client must still publish and consume."""
    params = pika.ConnectionParameters(
        "127.0.0.1", port, socket_timeout=5, blocked_connection_timeout=5
    )
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        body = f"still alive {tag}".encode()
        ch.basic_publish("", q, body)
        for _m, _p, got in ch.consume(q, auto_ack=True, inactivity_timeout=5):
            assert got == body, got
            break
        ch.cancel()
    finally:
        conn.close()


def fuzz(
    port: int,
    seed: int,
    cases: int | None = None,
    seconds: float | None = None,
    check_every: int = 50,
    broker: RoostBroker | None = None,
    errors: ErrorLog | None = None,
    verbose: bool = False,
) -> int:
    """Run cases until ``cases`` ran or ``seconds`` passed; return how many ran.
    Raises AssertionError on the first sign of a crash."""
    rng = random.Random(seed)
    fm = 131072
    start = time.monotonic()
    done = 0

    def check(tag: str) -> None:
        check_client(port, tag)
        if broker is not None:
            assert broker._thread is not None and broker._thread.is_alive(), "broker thread died"
        if errors is not None:
            crashes = errors.crashes()
            assert not crashes, f"unhandled exceptions after case {tag}: {crashes}"

    while True:
        if cases is not None and done >= cases:
            break
        if seconds is not None and time.monotonic() - start >= seconds:
            break
        case = rng.choice(CASES)
        handshake, payload = case(rng, fm)
        if verbose:
            print(f"#{done} {case.__name__} {len(payload)} bytes", file=sys.stderr)
        try:
            run_case(port, handshake, payload)
        except (AssertionError, OSError) as exc:
            raise AssertionError(f"case #{done} {case.__name__} (seed {seed}): {exc!r}") from exc
        if errors is not None and errors.crashes():
            raise AssertionError(
                f"case #{done} {case.__name__} (seed {seed}) crashed the handler: "
                f"{errors.crashes()}"
            )
        done += 1
        if done % check_every == 0:
            check(f"#{done} {case.__name__}")
    check("end")
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--port", type=int, default=0, help="fuzz a running broker (default: start one)")
    p.add_argument("--check-every", type=int, default=50)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    broker = None
    port = args.port
    if not port:
        broker = RoostBroker(http_port=-1).start()
        port = broker.port
    print(f"fuzzing 127.0.0.1:{port} for {args.seconds}s, seed {seed}", file=sys.stderr)
    try:
        n = fuzz(
            port,
            seed,
            seconds=args.seconds,
            check_every=args.check_every,
            broker=broker,
            errors=errors,
            verbose=args.verbose,
        )
    except AssertionError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if broker is not None:
            broker.stop()
    print(f"ok: {n} cases, no crash", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
