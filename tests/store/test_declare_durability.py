"""declare-ok, bind-ok and delete-ok for durable things mean "on disk":
a SIGKILL right after the reply loses none of them (as in RabbitMQ)."""

from __future__ import annotations

from pathlib import Path

import pika

from roost.testing import RoostProcess


def test_durable_declarations_survive_a_kill_right_after_the_reply(tmp_path: Path) -> None:
    with RoostProcess(tmp_path / "data") as proc:
        for i in range(5):
            conn = pika.BlockingConnection(pika.URLParameters(proc.url))
            ch = conn.channel()
            ch.exchange_declare(f"x{i}", "topic", durable=True)
            ch.queue_declare(f"q{i}", durable=True)
            ch.queue_bind(f"q{i}", f"x{i}", "k.#")
            if i:
                ch.queue_delete(f"q{i - 1}")
            proc.kill()  # no chance to save anything after the replies
            proc.start()
            conn = pika.BlockingConnection(pika.URLParameters(proc.url))
            ch = conn.channel()
            ch.exchange_declare(f"x{i}", "topic", durable=True, passive=True)
            ch.queue_declare(f"q{i}", durable=True, passive=True)
            ch.basic_publish(f"x{i}", "k.a", b"routed")
            _, _, body = ch.basic_get(f"q{i}", auto_ack=True)
            assert body == b"routed", "the binding came back too"
            if i:
                try:
                    ch.queue_declare(f"q{i - 1}", passive=True)
                    raise AssertionError(f"q{i - 1} was deleted before the kill")
                except pika.exceptions.ChannelClosedByBroker as exc:
                    assert exc.reply_code == 404
            conn.close()
