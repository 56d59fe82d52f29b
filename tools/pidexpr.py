"""PID expressions of the public profile databases, compiled for the device's evaluator.

Two dialects:
  wican -- WiCAN vehicle profiles: `Bn` byte n, `Sn` signed byte, `[Bi:Bj]` / `[Si:Sj]` the
           bytes i..j big-endian unsigned / signed, `Bn:k` bit k of byte n, numbers,
           `+ - * / & | ^ << >>` and parentheses, with WiCAN's precedence (`|` and `^` lowest,
           then `&`, `<< >>`, `+ -`, `* /`). Byte n counts in the CAN frames as received:
           every frame's ISO-TP PCI bytes included (B0 is the PCI of a single-frame answer,
           B0-B1 the first frame's, B8, B16, ... those of the consecutive frames). Which
           bytes those are depends on the answer's length, so the device maps the index
           when the answer is there (`raw_index`).
  abrp  -- A Better Routeplanner's ev-obd-pids (Torque-style): letters `A`..`Z`, `AA`..`ZZ`
           (either case) are the data bytes after the echoed service and PID (A the first),
           `Signed(X)` (8-bit), `Int16(A,B)`, `Int24(A,B,C)`, `Int32(A,B,C,D)`, `{A:n}` bit n,
           `+ - * / %`, `<< >>`, `& | ^`, `< > <= >= == !=`, `&& || !`, unary minus, `?:`,
           parentheses, `min(a,b)`, `max(a,b)`, `abs(x)`, with C precedence.

Values are numbers (ints while exact, floats after `/`); bit operations truncate to integers
(as the C evaluators do); comparisons and logic give 0 or 1. A division by zero, a shift by a
negative count or more than 63, or a byte beyond the answer makes the value absent (the
metric keeps its value).

The compiled form (`compile_expr`) is (code bytes, constants tuple): a stack program the
device runs (lib/ovms/poll/expr.py) without `eval` and without allocating per answer beyond
the numbers it computes. `evaluate` runs the same tree on the host (tools/pids.py check)."""
import re
import struct

# ---- opcodes (lib/ovms/poll/expr.py has the same numbers) ----------------------------------
OP_BYTE = 1     # u16 index: unsigned byte
OP_SBYTE = 2    # u16 index: signed byte
OP_RANGE = 3    # u16 first, u16 last, u8 signed: big-endian bytes first..last
OP_BIT = 4      # u16 index, u8 bit
OP_CONST = 5    # u8 constant index
BINARY = {"+": 10, "-": 11, "*": 12, "/": 13, "%": 14, "&": 15, "|": 16, "^": 17, "<<": 18,
          ">>": 19, "<": 20, ">": 21, "<=": 22, ">=": 23, "==": 24, "!=": 25, "&&": 26,
          "||": 27, "min": 28, "max": 29}
UNARY = {"neg": 40, "!": 41, "signed": 42, "abs": 43}
OP_COND = 50    # c a b -> a if c else b
STACK = 16      # the device's stack depth
MAX_CODE = 255

DIALECTS = ("wican", "abrp")


class ExprError(ValueError):
    """An expression the device cannot evaluate (the message says what)."""


# ---- parsing into a tree: ("byte", i) ("sbyte", i) ("range", i, j, signed) ("bit", i, k)
# ("num", x) ("bin", op, a, b) ("un", op, a) ("cond", c, a, b) -------------------------------

_WICAN_PREC = {"|": 1, "^": 1, "&": 2, "<<": 3, ">>": 3, "+": 4, "-": 4, "*": 5, "/": 5}
_C_PREC = {"||": 1, "&&": 2, "|": 3, "^": 4, "&": 5, "==": 6, "!=": 6, "<": 7, ">": 7,
           "<=": 7, ">=": 7, "<<": 8, ">>": 8, "+": 9, "-": 9, "*": 10, "/": 10, "%": 10}

_TOKENS = {
    "wican": re.compile(r"\s*(?:(?P<num>\d+(?:\.\d*)?|\.\d+)|(?P<range>\[\s*([BS])(\d+)\s*:\s*([BS])(\d+)\s*\])"
                        r"|(?P<bit>B(\d+):([0-7]))|(?P<byte>([BS])(\d+))|(?P<op><<|>>|[-+*/&|^()]))"),
    "abrp": re.compile(r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)|(?P<bit>\{\s*([A-Za-z]{1,3})\s*:\s*(\d+)\s*\})"
                       r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                       r"|(?P<op><<|>>|<=|>=|==|!=|&&|\|\||[-+*/%&|^()<>!?:,]))"),
}


def letter_index(s):
    """Torque byte letters: A=0 .. Z=25, AA=26 .. AZ=51, BA=52 ... (either case)."""
    s = s.upper()
    if not re.fullmatch(r"[A-Z]{1,3}", s):
        raise ExprError("not a byte letter: %s" % s)
    n = 0
    for c in s:
        n = n * 26 + (ord(c) - 64)
    return n - 1


def _tokens(text, dialect):
    rx = _TOKENS[dialect]
    pos, out = 0, []
    text = text.strip()
    while pos < len(text):
        m = rx.match(text, pos)
        if not m or m.end() == pos:
            raise ExprError("cannot read %r at character %d" % (text[pos:pos + 12], pos + 1))
        pos = m.end()
        g = m.lastgroup
        if g == "num":
            v = m.group("num")
            out.append(("num", float(v) if ("." in v or "e" in v.lower()) else int(v)))
        elif g == "range":
            a, i, b, j = m.group(3), int(m.group(4)), m.group(5), int(m.group(6))
            if a != b:
                raise ExprError("range [%s%d:%s%d] mixes B and S" % (a, i, b, j))
            if j < i or j - i > 7:
                raise ExprError("range [%s%d:%s%d] must run forward over 1..8 bytes" % (a, i, b, j))
            out.append(("val", ("range", i, j, a == "S")))
        elif g == "bit" and dialect == "wican":
            out.append(("val", ("bit", int(m.group(m.re.groupindex["bit"] + 1)),
                                int(m.group(m.re.groupindex["bit"] + 2)))))
        elif g == "bit":
            k = int(m.group(m.re.groupindex["bit"] + 2))
            if k > 7:
                raise ExprError("bit {%s:%d}: bits are 0..7" % (m.group(m.re.groupindex["bit"] + 1), k))
            out.append(("val", ("bit", letter_index(m.group(m.re.groupindex["bit"] + 1)), k)))
        elif g == "byte":
            kind, i = m.group(m.re.groupindex["byte"] + 1), int(m.group(m.re.groupindex["byte"] + 2))
            out.append(("val", ("byte" if kind == "B" else "sbyte", i)))
        elif g == "name":
            out.append(("name", m.group("name")))
        else:
            out.append(("op", m.group("op")))
    return out


class _Parser:
    def __init__(self, text, dialect):
        self.t = _tokens(text, dialect)
        self.i = 0
        self.d = dialect
        self.prec = _WICAN_PREC if dialect == "wican" else _C_PREC

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else (None, None)

    def take(self, op=None):
        tok = self.peek()
        if op is not None and tok != ("op", op):
            raise ExprError("expected %r, found %s" % (op, tok[1] if tok[0] else "the end"))
        self.i += 1
        return tok

    def parse(self):
        if not self.t:
            raise ExprError("empty expression")
        e = self.expr()
        if self.i != len(self.t):
            raise ExprError("unexpected %r" % (self.peek()[1],))
        return e

    def expr(self):
        e = self.binary(1)
        if self.d == "abrp" and self.peek() == ("op", "?"):
            self.take()
            a = self.expr()
            self.take(":")
            b = self.expr()
            return ("cond", e, a, b)
        return e

    def binary(self, level):
        e = self.unary()
        while True:
            kind, op = self.peek()
            p = self.prec.get(op) if kind == "op" else None
            if p is None or p < level:
                return e
            self.take()
            e = ("bin", op, e, self.binary(p + 1))

    def unary(self):
        kind, v = self.peek()
        if kind == "op" and v in ("-", "+", "!") and (self.d == "abrp" or v != "!"):
            self.take()
            a = self.unary()
            if v == "+":
                return a
            return ("un", "neg" if v == "-" else "!", a)
        return self.atom()

    def atom(self):
        kind, v = self.take()
        if kind is None:
            raise ExprError("the expression ends too early")
        if kind == "num":
            return ("num", v)
        if kind == "val":
            return v
        if kind == "op" and v == "(":
            e = self.expr()
            self.take(")")
            return e
        if kind == "name":
            return self.name(v)
        raise ExprError("unexpected %r" % (v,))

    def args(self):
        self.take("(")
        out = [self.expr()]
        while self.peek() == ("op", ","):
            self.take()
            out.append(self.expr())
        self.take(")")
        return out

    def name(self, v):
        f = v.lower()
        if self.peek() == ("op", "("):
            a = self.args()
            if f == "signed" and len(a) == 1:
                return ("un", "signed", a[0])
            if f in ("int16", "int24", "int32") and len(a) == {"int16": 2, "int24": 3, "int32": 4}[f]:
                e = a[0]
                for x in a[1:]:
                    e = ("bin", "+", ("bin", "*", e, ("num", 256)), x)
                return e
            if f in ("min", "max") and len(a) == 2:
                return ("bin", f, a[0], a[1])
            if f == "abs" and len(a) == 1:
                return ("un", "abs", a[0])
            raise ExprError("unsupported function %s() with %d argument(s)" % (v, len(a)))
        if re.fullmatch(r"[A-Za-z]{1,3}", v):
            return ("byte", letter_index(v))
        raise ExprError("unknown name %r" % v)


def parse(text, dialect):
    """Expression text -> tree (raises ExprError naming what it cannot read)."""
    if dialect not in DIALECTS:
        raise ExprError("unknown dialect %r" % dialect)
    if not isinstance(text, str):
        raise ExprError("expression must be text")
    return _Parser(text, dialect).parse()


def indexes(tree):
    """Every byte index the tree reads (in the dialect's numbering)."""
    k = tree[0]
    if k in ("byte", "sbyte", "bit"):
        return {tree[1]}
    if k == "range":
        return set(range(tree[1], tree[2] + 1))
    if k == "num":
        return set()
    out = set()
    for t in tree[2:] if k == "bin" else tree[1:] if k == "cond" else tree[2:]:
        out |= indexes(t)
    return out


# ---- compiling ---------------------------------------------------------------------------

def _fold(t):
    """Constant subtrees computed on the host."""
    k = t[0]
    if k == "bin":
        a, b = _fold(t[2]), _fold(t[3])
        if a[0] == "num" and b[0] == "num":
            v = apply_bin(t[1], a[1], b[1])
            if v is not None:
                return ("num", v)
        return ("bin", t[1], a, b)
    if k == "un":
        a = _fold(t[2])
        if a[0] == "num":
            v = apply_un(t[1], a[1])
            if v is not None:
                return ("num", v)
        return ("un", t[1], a)
    if k == "cond":
        return ("cond", _fold(t[1]), _fold(t[2]), _fold(t[3]))
    return t


def compile_expr(text, dialect):
    """Expression text -> (code bytes, constants tuple) for lib/ovms/poll/expr.py."""
    tree = _fold(parse(text, dialect))
    code = bytearray()
    consts = []
    depth = [0, 0]

    def push(n=1):
        depth[0] += n
        depth[1] = max(depth[1], depth[0])

    def idx(i):
        if not 0 <= i <= 0xFFFF:
            raise ExprError("byte index %d out of range" % i)
        return struct.pack("<H", i)

    def emit(t):
        k = t[0]
        if k == "num":
            v = t[1]
            if v not in consts:
                consts.append(v)
            if len(consts) > 255:
                raise ExprError("too many constants")
            code.extend((OP_CONST, consts.index(v)))
            push()
        elif k == "byte":
            code.append(OP_BYTE)
            code.extend(idx(t[1]))
            push()
        elif k == "sbyte":
            code.append(OP_SBYTE)
            code.extend(idx(t[1]))
            push()
        elif k == "range":
            code.append(OP_RANGE)
            code.extend(idx(t[1]) + idx(t[2]))
            code.append(1 if t[3] else 0)
            push()
        elif k == "bit":
            code.append(OP_BIT)
            code.extend(idx(t[1]))
            code.append(t[2])
            push()
        elif k == "bin":
            emit(t[2])
            emit(t[3])
            code.append(BINARY[t[1]])
            depth[0] -= 1
        elif k == "un":
            emit(t[2])
            code.append(UNARY[t[1]])
        elif k == "cond":
            emit(t[1])
            emit(t[2])
            emit(t[3])
            code.append(OP_COND)
            depth[0] -= 2
        else:
            raise ExprError("cannot compile %r" % (k,))
    emit(tree)
    if depth[1] > STACK:
        raise ExprError("expression too deep for the device (%d > %d stack slots)" % (depth[1], STACK))
    if len(code) > MAX_CODE:
        raise ExprError("expression too long for the device (%d > %d bytes of code)" % (len(code), MAX_CODE))
    return bytes(code), tuple(consts)


# ---- the same semantics on the host (pids.py check) ----------------------------------------

def _int(x):
    return int(x)       # C's cast: truncation toward zero


def apply_bin(op, a, b):
    if a is None or b is None:
        return None
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return None if b == 0 else a / b
    if op == "%":
        return None if _int(b) == 0 else int(_c_mod(_int(a), _int(b)))
    if op in ("&", "|", "^"):
        a, b = _int(a), _int(b)
        return a & b if op == "&" else a | b if op == "|" else a ^ b
    if op in ("<<", ">>"):
        a, b = _int(a), _int(b)
        if not 0 <= b <= 63:
            return None
        return a << b if op == "<<" else a >> b
    if op == "<":
        return int(a < b)
    if op == ">":
        return int(a > b)
    if op == "<=":
        return int(a <= b)
    if op == ">=":
        return int(a >= b)
    if op == "==":
        return int(a == b)
    if op == "!=":
        return int(a != b)
    if op == "&&":
        return int(bool(a) and bool(b))
    if op == "||":
        return int(bool(a) or bool(b))
    if op == "min":
        return a if a <= b else b
    if op == "max":
        return a if a >= b else b
    raise ExprError("operator %s" % op)


def _c_mod(a, b):
    r = abs(a) % abs(b)
    return -r if a < 0 else r


def apply_un(op, a):
    if a is None:
        return None
    if op == "neg":
        return -a
    if op == "!":
        return int(not a)
    if op == "signed":
        a = _int(a) & 0xFF
        return a - 256 if a > 127 else a
    if op == "abs":
        return -a if a < 0 else a
    raise ExprError("operator %s" % op)


def raw_index(i, n):
    """WiCAN byte i (counted in the CAN frames, PCI bytes included) -> index into the ISO-TP
    payload of n bytes, or None for a PCI byte or one beyond the answer."""
    if n <= 7:                      # single frame: PCI, then the payload
        j = i - 1
    else:
        f, p = divmod(i, 8)
        if f == 0:
            j = p - 2 if p >= 2 else -1
        else:
            j = 6 + 7 * (f - 1) + p - 1 if p >= 1 else -1
    return j if 0 <= j < n else None


def evaluate(tree, payload, off, dialect):
    """The value of tree for an answer payload (service byte first); off: the echoed request's
    length (abrp letters count from there). None when the value is absent."""
    n = len(payload)

    def at(i):
        j = raw_index(i, n) if dialect == "wican" else (off + i if off + i < n else None)
        return None if j is None else payload[j]

    def ev(t):
        k = t[0]
        if k == "num":
            return t[1]
        if k in ("byte", "sbyte"):
            v = at(t[1])
            if v is None or k == "byte":
                return v
            return v - 256 if v > 127 else v
        if k == "bit":
            v = at(t[1])
            return None if v is None else (v >> t[2]) & 1
        if k == "range":
            r = 0
            for i in range(t[1], t[2] + 1):
                v = at(i)
                if v is None:
                    return None
                r = r << 8 | v
            z = 8 * (t[2] - t[1] + 1)
            return r - (1 << z) if t[3] and r >> (z - 1) else r
        if k == "bin":
            return apply_bin(t[1], ev(t[2]), ev(t[3]))
        if k == "un":
            return apply_un(t[1], ev(t[2]))
        if k == "cond":
            c = ev(t[1])
            return None if c is None else ev(t[2]) if c else ev(t[3])
        raise ExprError(k)
    return ev(tree)
