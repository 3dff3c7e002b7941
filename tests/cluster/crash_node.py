"""A node that publishes and consumes until it is killed (for
test_node_crash): ``python -m tests.cluster.crash_node URL EPOCH QUEUE_ID``.

Prints ``confirmed <n>`` once publish n is confirmed and ``delivered <n>``
for every delivery (never acked), flushing each line."""

from __future__ import annotations

import asyncio
import sys

from roost.broker.consumer import Consumer
from roost.broker.message import Message, QueueEntry
from roost.broker.queue import Queue
from roost.broker.vhost import VirtualHost
from roost.cluster.node_messages import NodeMessages
from roost.cluster.pg_backing import attach


class PrintingSink:
    def credit(self) -> int:
        return 1 << 30

    def deliver(self, consumer: Consumer, entries: list[QueueEntry]) -> None:
        for e in entries:
            print("delivered", e.message.body.decode(), flush=True)

    def dispatch_soon(self, queue: Queue) -> None:
        asyncio.get_running_loop().call_soon(queue.dispatch)

    def cancelled_by_server(self, consumer: Consumer) -> None:
        pass


async def main(url: str, epoch: int, queue_id: int) -> None:
    node = NodeMessages(url, epoch)
    await node.start()
    vhost = VirtualHost("/", journal=node.journal)
    vhost.scheduler = asyncio.get_running_loop().call_later
    queue = vhost.declare_queue("q", owner=None, durable=True)
    attach(queue, node.backing_queue(queue_id, True))
    queue.add_consumer(Consumer("c", queue, PrintingSink(), prefetch=20))
    journal = node.journal
    n = 0
    while True:
        for _ in range(10):
            n += 1
            message = Message("", "q", b"\x10\x00\x02", str(n).encode(), True)
            batch = vhost.publish(vhost.default_exchange, message)[2]

            def confirm(n: int = n, batch: int = batch) -> None:
                if journal.failure(batch) is None:
                    print("confirmed", n, flush=True)

            journal.wait_durable(batch, confirm)
        await asyncio.sleep(0.001)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
