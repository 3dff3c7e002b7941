"""Back-pressure for one AMQP connection, both ways, sans-IO.

Modelled on uvicorn's ``FlowControl`` (``uvicorn/protocols/http/flow_control.py``),
but it decides rather than acts: the asyncio glue pauses and resumes the
transport when a method here says so, which keeps this testable without one.

- Writing: the transport's buffer passed its high-water mark
  (``pause_writing``) until it drains (``resume_writing``). While it is
  paused the connection's consumers get no credit, so queues stop handing
  them messages.
- Reading: while a resource alarm is set, a connection that publishes is
  no longer read once the current read is handled (RabbitMQ's
  ``connection.blocked`` semantics); connections that only consume keep
  being read. A connection that is not read cannot be blamed for missing
  heartbeats, so the heartbeat check is suspended meanwhile.
"""

from __future__ import annotations


class FlowControl:
    __slots__ = ("_published_while_blocked", "reading_paused", "writable")

    def __init__(self) -> None:
        self.writable = True
        self.reading_paused = False
        self._published_while_blocked = False

    # -- writing ---------------------------------------------------------

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True

    # -- reading ---------------------------------------------------------

    def blocked_publish(self) -> None:
        """A publish was read while an alarm is set (the caller checks the
        alarm, so a publish costs nothing more when there is none)."""
        self._published_while_blocked = True

    def pause_reading(self) -> bool:
        """A read was handled while an alarm is set: whether to stop
        reading now (once the connection has published during the alarm)."""
        if self._published_while_blocked and not self.reading_paused:
            self.reading_paused = True
            return True
        return False

    def unblocked(self) -> bool:
        """Every alarm cleared: whether reading must resume."""
        self._published_while_blocked = False
        if self.reading_paused:
            self.reading_paused = False
            return True
        return False

    @property
    def heartbeats_expected(self) -> bool:
        """Whether the client's heartbeats can arrive (we are reading)."""
        return not self.reading_paused
