"""micro-ovms: OVMS-style vehicle module firmware for MicroPython."""
VERSION = "0.1.0"
