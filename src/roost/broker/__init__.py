"""Protocol-agnostic broker model: vhosts, exchanges, queues, consumers.

Nothing in this package imports :mod:`roost.amqp`; channels reach the model
through the calls here and receive deliveries through :class:`DeliverySink`.
"""

from roost.broker.broker import Broker
from roost.broker.errors import BrokerError
from roost.broker.message import Message
from roost.broker.queue import Queue
from roost.broker.vhost import VirtualHost

__all__ = ["Broker", "BrokerError", "Message", "Queue", "VirtualHost"]
