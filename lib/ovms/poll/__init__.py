"""Diagnostic poller: ISO-TP transport, OBD-II/UDS poll lists, the generic OBD-II profile."""
