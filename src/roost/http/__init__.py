"""The HTTP management API, compatible with RabbitMQ's management plugin."""
