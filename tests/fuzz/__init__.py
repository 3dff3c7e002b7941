"""Fuzzing the AMQP listener with hostile input (see docs/fuzzing.md)."""
