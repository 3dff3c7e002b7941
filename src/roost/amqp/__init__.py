"""AMQP 0-9-1 wire layer: a sans-IO frame decoder and encoders, the channel
that bridges frames to the broker model, and the asyncio server glue."""
