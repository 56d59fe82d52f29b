"""CAN: bus driver, filters, signal decoder, vehicle definitions."""
