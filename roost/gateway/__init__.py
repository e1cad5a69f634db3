"""Gateway layer: sockets, framing, authentication, heartbeats, backpressure."""
