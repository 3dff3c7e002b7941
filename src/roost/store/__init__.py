"""Durability: the message segment log, definitions, and the data directory."""
