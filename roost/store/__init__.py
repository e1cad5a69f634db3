"""Store layer: durable messages, sequence numbers, membership, inbox marks."""
