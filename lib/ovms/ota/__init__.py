"""ota: OTA status, health commit and the receiver hook for the MQTT server (device side)."""
# Hooks:
#   boot.py        import ota_boot; ota_boot.select()      (slot, trial boots, rollback)
#   app            ota.mark_healthy() once MQTT is connected and CAN runs; ota.guard(deadline)
#                  as a task; ota_boot.crashed(exc) when the app dies (logs, counts, resets)
#   MQTT server    subscribe <prefix>client/+/ota/+ (QoS 1); for each message (not retained)
#                  reply = receiver().handle(op, payload) -> publish it on
#                  <prefix>client/<cid>/ota-reply (QoS 1, no need to wait for the PUBACK);
#                  one request at a time, small bounded queue (the host resends what is dropped);
#                  after the reply to "reboot" (receiver().reboot is True): ~1 s, machine.reset()
#   shell          `ota status` (ovms.shell.ota) -> status_text()
import sys
import ota_boot
from ovms.ota.fs import free

REPLY = "ota-reply"             # reply topic under <prefix>client/<cid>/ (requests: .../ota/<op>)
_ARCHS = ("", "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp", "armv7emdp",
          "xtensa", "xtensawin", "rv32imc", "rv64imc")


def arch():
    """(mpy-cross -march name of this device, .mpy version)."""
    m = sys.implementation._mpy
    a = (m >> 10) & 0x3F
    return _ARCHS[a] if a < len(_ARCHS) else "?", m & 0xFF


def set_pubkey(pem):
    """Validate and store the OTA public key PEM (provisioning over serial calls this)."""
    from ovms.ota.rsa import set_pubkey as sp
    sp(pem)


_rx = None


def receiver():
    """The shared OTA receiver: receiver().handle(op, payload) -> reply bytes (see ovms.ota.rx).
    Best created when the MQTT server starts, before the heap fragments."""
    global _rx
    if _rx is None:
        import gc
        gc.collect()
        from ovms.ota.rx import Receiver
        _rx = Receiver()
    return _rx


def version(slot):
    """Version string of an app slot ("a"/"b"/"f"), or None."""
    if not slot:
        return None
    if slot == "f":
        if ota_boot.booted in (None, "f"):
            try:
                import ovms
                return ovms.VERSION
            except Exception:
                pass
        return "factory"
    m = ota_boot.manifest(slot)
    return m.get("version") if m else None


def _fw_label():
    try:
        import esp32
        return esp32.Partition(esp32.Partition.RUNNING).info()[4]
    except Exception:
        return None


def status(rx=None):
    """Dict: running/staged/previous versions, trial, last failure, firmware, transfer progress."""
    rx = rx or _rx
    s = ota_boot.load()
    b = ota_boot.booted or "f"
    a, mpy = arch()
    d = {"arch": a, "mpy": mpy, "slot": b, "running": version(b), "trial": ota_boot.trial,
         "staged": version(s.get("stg")), "previous": version(s.get("prev")),
         "fail": s.get("fail"), "firmware": _fw_label(), "fw": s.get("fw"), "free": free()}
    if rx is not None and rx.id:
        d["rx"] = {"id": rx.id, "next": rx.next, "size": rx.size}
    return d


def status_text(rx=None):
    """The `ota status` shell output."""
    d = status(rx)
    out = ["Running:  %s (%s)%s" % (d["running"], "factory" if d["slot"] == "f" else
                                    "slot " + d["slot"], " on trial" if d["trial"] else ""),
           "Staged:   %s" % (d["staged"] or "-"),
           "Previous: %s" % (d["previous"] or "-")]
    if d["firmware"]:
        fw = d["fw"] or {}
        out.append("Firmware: %s%s" % (d["firmware"], " (update %s %s)" % (fw.get("ver"), fw.get(
            "st")) if fw else ""))
    if d.get("rx"):
        out.append("Transfer: %d/%d bytes" % (d["rx"]["next"], d["rx"]["size"]))
    if d["fail"]:
        out.append("Last failure: %s" % d["fail"])
    return "\n".join(out)


def mark_healthy():
    """The app calls this once MQTT is connected and CAN runs; commits a trial version."""
    return ota_boot.mark_healthy()


async def guard(deadline=None):
    """Task: reset if a trial version is not healthy by its deadline (the next boot rolls back)."""
    import asyncio
    if not ota_boot.trial:
        return
    await asyncio.sleep(deadline or ota_boot.load().get("dl") or ota_boot.DEADLINE)
    ota_boot.expire()
