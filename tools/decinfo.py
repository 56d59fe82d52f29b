"""decinfo: the device decoder plus the table introspection only host tools and tests use.

On micropython beside lib/ (tools/ on sys.path), `from decinfo import Decoder` gives
ovms.can.decoder.Decoder plus find(), conv(), choices() and signal_message(); the functions
also take any decoder object as first argument (CPython runs of decoder.py). The firmware
never needs them, so they cost the device no RAM."""
import struct
import sys

_CONV_LEN = 20      # one conversion record
_U_CONV = 13        # decoder _u32 slots holding the conversions' and choices' offsets
_U_CHO = 14


def signal_message(self, k):
    """Message index of signal k."""
    return self._sig(k)[12]


def conv(self, k, convert=True):
    """(scale, offset) of signal k (convert: with the mapping's factor/add)."""
    s = self._sig(k)
    c = s[8] if convert else s[7]
    sc, of, si, oi = struct.unpack_from("<ddBB", self._t, self._u32[_U_CONV] + c * _CONV_LEN)
    return (int(sc) if si else sc, int(of) if oi else of)


def choices(self, k):
    """[(raw value, label)] of signal k (VAL_ table; empty if none)."""
    s = self._sig(k)
    fc = self._fc
    lc = struct.calcsize(fc)
    out = []
    for i in range(s[14], s[14] + s[13]):
        v, so = struct.unpack_from(fc, self._t, self._u32[_U_CHO] + i * lc)
        out.append((v, self._str(so)))
    return out


def find(self, sig_name, msg_name=None):
    """Index of the first signal named sig_name (in message msg_name), -1 if none."""
    for k in range(self.nsignals):
        inf = self.info(k)
        if inf[1] == sig_name and (msg_name is None or inf[0] == msg_name):
            return k
    return -1


if sys.implementation.name == "micropython":
    from ovms.can.decoder import Decoder as _Decoder

    class Decoder(_Decoder):
        signal_message = signal_message
        conv = conv
        choices = choices
        find = find
