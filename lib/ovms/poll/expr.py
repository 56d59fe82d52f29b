"""PID expressions on the device: runs the stack programs tools/pidexpr.py compiles."""
from micropython import const

_BYTE = const(1)
_SBYTE = const(2)
_RANGE = const(3)
_BIT = const(4)
_CONST = const(5)
_NEG = const(40)
_COND = const(50)

_st = [0] * 16          # the one evaluation stack (the poller runs one answer at a time)


def _idx(i, n, raw):
    # raw (WiCAN): i counts CAN frame bytes, PCI bytes included; else i is a payload index
    if raw:
        if n <= 7:
            i -= 1
        else:
            f = i >> 3
            p = i & 7
            if f == 0:
                i = p - 2 if p >= 2 else -1
            else:
                i = 6 + 7 * (f - 1) + p - 1 if p >= 1 else -1
    return i if 0 <= i < n else -1


def run(code, consts, buf, off, n, raw):
    """The value of a compiled expression for the answer buf[:n] (service byte first; off: the
    echoed request's length, where letter A of the abrp dialect is), or None if absent."""
    st = _st
    sp = 0
    pc = 0
    end = len(code)
    while pc < end:
        op = code[pc]
        pc += 1
        if op <= _BIT:
            a = code[pc] | code[pc + 1] << 8
            pc += 2
            if op == _RANGE:
                j = code[pc] | code[pc + 1] << 8
                sg = code[pc + 2]
                pc += 3
                r = 0
                k = a
                while k <= j:
                    x = _idx(k if raw else off + k, n, raw)
                    if x < 0:
                        r = None
                        break
                    r = r << 8 | buf[x]
                    k += 1
                if r is not None and sg:
                    z = 8 * (j - a + 1)
                    if r >> (z - 1):
                        r -= 1 << z
                st[sp] = r
            else:
                i = _idx(a if raw else off + a, n, raw)
                if op == _BIT:
                    b = code[pc]
                    pc += 1
                if i < 0:
                    st[sp] = None
                elif op == _BYTE:
                    st[sp] = buf[i]
                elif op == _SBYTE:
                    v = buf[i]
                    st[sp] = v - 256 if v > 127 else v
                else:
                    st[sp] = (buf[i] >> b) & 1
            sp += 1
        elif op == _CONST:
            st[sp] = consts[code[pc]]
            pc += 1
            sp += 1
        elif op < _NEG:
            sp -= 1
            st[sp - 1] = _bin(op, st[sp - 1], st[sp])
        elif op < _COND:
            st[sp - 1] = _un(op, st[sp - 1])
        else:
            sp -= 2
            c = st[sp - 1]
            st[sp - 1] = None if c is None else st[sp] if c else st[sp + 1]
    v = st[0] if sp == 1 else None
    for k in range(sp):
        st[k] = 0
    return v


def _bin(op, a, b):
    if a is None or b is None:
        return None
    if op == 10:
        return a + b
    if op == 11:
        return a - b
    if op == 12:
        return a * b
    if op == 13:
        return None if b == 0 else a / b
    if op <= 19:
        a = int(a)
        b = int(b)
        if op == 14:
            if b == 0:
                return None
            r = (a if a >= 0 else -a) % (b if b >= 0 else -b)
            return -r if a < 0 else r
        if op == 15:
            return a & b
        if op == 16:
            return a | b
        if op == 17:
            return a ^ b
        if b < 0 or b > 63:
            return None
        return a << b if op == 18 else a >> b
    if op == 20:
        return 1 if a < b else 0
    if op == 21:
        return 1 if a > b else 0
    if op == 22:
        return 1 if a <= b else 0
    if op == 23:
        return 1 if a >= b else 0
    if op == 24:
        return 1 if a == b else 0
    if op == 25:
        return 1 if a != b else 0
    if op == 26:
        return 1 if a and b else 0
    if op == 27:
        return 1 if a or b else 0
    if op == 28:
        return a if a <= b else b
    return a if a >= b else b


def _un(op, a):
    if a is None:
        return None
    if op == _NEG:
        return -a
    if op == 41:
        return 0 if a else 1
    if op == 42:
        a = int(a) & 0xFF
        return a - 256 if a > 127 else a
    return -a if a < 0 else a
