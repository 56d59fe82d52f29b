"""Wi-Fi station from config with backoff, SNTP when the clock is unset, m.net.* metrics."""
import asyncio
import random
import time

from micropython import const

from ovms import config, events, metrics

_MAX_BACKOFF = const(60)
_JOIN_S = const(15)
_EPOCH = 946684800 if time.gmtime(0)[0] == 2000 else 0    # Unix seconds at the port's epoch
up = False
synced = False      # the clock was set by SNTP


def _set(name, value):
    try:
        metrics.set(name, value)
    except (ValueError, KeyError):
        pass


async def sntp(host="pool.ntp.org", timeout_ms=2000):
    """Set the clock from an NTP server without blocking the loop; True on success."""
    import socket
    import struct
    try:
        addr = socket.getaddrinfo(host, 123)[0][-1]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except (OSError, IndexError):
        return False
    try:
        s.setblocking(False)
        q = bytearray(48)
        q[0] = 0x1B
        s.sendto(q, addr)
        t0 = time.ticks_ms()
        while time.ticks_diff(time.ticks_ms(), t0) < timeout_ms:
            try:
                msg = s.recv(48)
            except OSError:
                await asyncio.sleep_ms(50)
                continue
            set_clock(struct.unpack("!I", msg[40:44])[0] - 2208988800)
            global synced
            synced = True       # the GPS leaves the clock alone from now on
            return True
    finally:
        s.close()
    return False


def set_clock(unix):
    """Set the RTC to Unix seconds (SNTP, a GPS fix)."""
    import machine
    tm = time.gmtime(unix - _EPOCH)
    machine.RTC().datetime((tm[0], tm[1], tm[2], tm[6] + 1, tm[3], tm[4], tm[5], 0))


def _networks():
    return config.instances("wifi.ssid")


async def run():
    """Task: keep the station connected; raise network.up / network.down."""
    global up
    import network
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    backoff = 1
    attempt = 0
    told = False
    while True:
        if wlan.isconnected():
            if not up:
                up = True
                backoff = 1
                ip = wlan.ifconfig()[0]
                _set("m.net.connected", True)
                _set("m.net.ip", ip)
                _set("m.net.type", "wifi")
                _set("m.net.wifi.network", wlan.config("ssid") or "")
                print("net: Wi-Fi up, ip", ip)
                events.raise_event("network.up")
                if time.gmtime()[0] < 2024:
                    await sntp()
            rssi = wlan.status("rssi")
            _set("m.net.wifi.sq", rssi)
            _set("m.net.sq", rssi)
            await asyncio.sleep(2)
            continue
        if up:
            up = False
            _set("m.net.connected", False)
            _set("m.net.ip", "")
            print("net: Wi-Fi down")
            events.raise_event("network.down")
        nets = _networks()
        if not nets:
            if not told:
                print("net: no Wi-Fi configured (config set wifi.ssid <ssid> <password>)")
                told = True
            await asyncio.sleep(5)
            continue
        ssid = nets[attempt % len(nets)]
        attempt += 1
        try:
            wlan.connect(ssid, config.get("wifi.ssid", ssid) or "")
        except OSError as e:
            print("net: connect", ssid, "failed:", e)
        t0 = time.ticks_ms()
        while not wlan.isconnected() and time.ticks_diff(time.ticks_ms(), t0) < _JOIN_S * 1000:
            await asyncio.sleep_ms(250)
        if not wlan.isconnected():
            delay = backoff + random.getrandbits(10) * backoff // 1024
            print("net: cannot join", ssid, "- retry in", delay, "s")
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, _MAX_BACKOFF)
