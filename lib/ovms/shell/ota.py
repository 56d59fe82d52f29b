"""shell.ota: the `ota status` shell command (running/staged/previous versions, transfer, failures)."""
from ovms import shell, ota


def _status(session, args):
    return ota.status_text()


shell.register("ota", "OTA updates", None)
shell.register("ota status", "Show running, staged and previous versions", _status, "", 0, 0, False)
