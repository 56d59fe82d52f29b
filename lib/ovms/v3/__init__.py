"""OVMS v3 server: MQTT topic layout, metric scheduler, persistent outbox, signed commands."""
