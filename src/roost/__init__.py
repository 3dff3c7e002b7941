"""roost: a message broker in Python that speaks AMQP 0-9-1."""

__version__ = "0.1.0"
