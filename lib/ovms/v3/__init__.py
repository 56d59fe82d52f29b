"""OVMS v3 server protocol: server, scheduler, outbox, signed commands."""
