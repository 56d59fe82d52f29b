"""Generic OBD-II profile (SAE J1979 mode 01, any car): PID support discovery and the common PIDs."""

# Entries as in a vehicle's POLL (firmware/vehicles/README.md, "poll"): functional requests
# (0x7DF, first ECU to answer, usually the engine ECU 0x7E8) on can0 (the OBD port).
# (bus, txid, rxid, flags, request, (off, awake, on, charging) s, gate PID, values)
# value: (metric, start, size, kind, bit, scale, offset); kind 0 = unsigned big-endian
_D = (60, 60, 60, 60)           # discovery: again every minute (an ECU may wake up later)
_F = (10, 10, 2, 10)            # fast values
_S = (60, 60, 30, 60)           # slow values
POLL = (
    (0, 0x7DF, 0, 2, b"\x01\x00", _D, -1, ()),
    (0, 0x7DF, 0, 2, b"\x01\x20", _D, 0x20, ()),
    (0, 0x7DF, 0, 2, b"\x01\x40", _D, 0x40, ()),
    (0, 0x7DF, 0, 2, b"\x01\x60", _D, 0x60, ()),
    (0, 0x7DF, 0, 2, b"\x01\x80", _D, 0x80, ()),
    (0, 0x7DF, 0, 2, b"\x01\xa0", _D, 0xA0, ()),
    (0, 0x7DF, 0, 0, b"\x01\x0d", _F, 0x0D, (("v.p.speed", 0, 1, 0, 0, 1, 0),)),
    (0, 0x7DF, 0, 0, b"\x01\x0c", _F, 0x0C, (("v.m.rpm", 0, 2, 0, 0, 0.25, 0),)),
    (0, 0x7DF, 0, 0, b"\x01\x11", _F, 0x11, (("v.e.throttle", 0, 1, 0, 0, 100 / 255, 0),)),
    (0, 0x7DF, 0, 0, b"\x01\x04", _F, 0x04, (("xobd.e.load", 0, 1, 0, 0, 100 / 255, 0),)),
    (0, 0x7DF, 0, 0, b"\x01\x05", _S, 0x05, (("xobd.e.coolant.temp", 0, 1, 0, 0, 1, -40),)),
    (0, 0x7DF, 0, 0, b"\x01\x0f", _S, 0x0F, (("xobd.e.intake.temp", 0, 1, 0, 0, 1, -40),)),
    (0, 0x7DF, 0, 0, b"\x01\x5c", _S, 0x5C, (("xobd.e.oil.temp", 0, 1, 0, 0, 1, -40),)),
    (0, 0x7DF, 0, 0, b"\x01\x46", _S, 0x46, (("v.e.temp", 0, 1, 0, 0, 1, -40),)),
    (0, 0x7DF, 0, 0, b"\x01\x2f", _S, 0x2F, (("xobd.e.fuel.level", 0, 1, 0, 0, 100 / 255, 0),)),
    (0, 0x7DF, 0, 0, b"\x01\x42", _S, 0x42, (("v.b.12v.voltage", 0, 2, 0, 0, 0.001, 0),)),
    (0, 0x7DF, 0, 0, b"\x01\x5b", _S, 0x5B, (("v.b.soc", 0, 1, 0, 0, 100 / 255, 0),)),
    (0, 0x7DF, 0, 0, b"\x01\x1f", _S, 0x1F, (("xobd.e.runtime", 0, 2, 0, 0, 1, 0),)),
    (0, 0x7DF, 0, 0, b"\x01\xa6", _S, 0xA6, (("v.p.odometer", 0, 4, 0, 0, 0.1, 0),)),
)
