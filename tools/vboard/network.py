"""Virtual ESP32 `network` module: a Wi-Fi station whose link state the host controls."""
import machine

import _hw

STA_IF = 0
AP_IF = 1
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202
_hostname = ["micro-ovms"]


def hostname(name=None):
    if name is None:
        return _hostname[0]
    _hostname[0] = name


class WLAN:
    _active = [False, False]
    _ssid = [None]

    def __init__(self, interface_id=STA_IF):
        self._if = interface_id

    def active(self, is_active=None):
        if is_active is None:
            return WLAN._active[self._if]
        WLAN._active[self._if] = bool(is_active)

    def connect(self, ssid=None, key=None, *, bssid=None):
        if not WLAN._active[self._if]:
            raise OSError("Wifi Not Started")
        WLAN._ssid[0] = ssid

    def disconnect(self):
        WLAN._ssid[0] = None

    def isconnected(self):
        return bool(WLAN._active[self._if] and WLAN._ssid[0] is not None and _hw.state["wifi"])

    def status(self, param=None):
        if param == "rssi":
            return _hw.state.get("rssi", -58)
        if self.isconnected():
            return STAT_GOT_IP
        return STAT_CONNECTING if WLAN._ssid[0] is not None else STAT_IDLE

    def ifconfig(self, cfg=None):
        if self.isconnected():
            return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")
        return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0")

    def ipconfig(self, key=None, **kw):
        if key == "addr4":
            a = self.ifconfig()
            return (a[0], a[1])
        return None

    def config(self, key=None, **kw):
        if key == "mac":
            return machine.unique_id()
        if key == "ssid" or key == "essid":
            return WLAN._ssid[0] or ""
        if key == "hostname":
            return _hostname[0]
        return None

    def scan(self):
        return [((WLAN._ssid[0] or "vdev").encode(), b"\x02\x00\x00\x00\x00\x01", 6,
                 _hw.state.get("rssi", -58), 3, False)]
