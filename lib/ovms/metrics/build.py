"""Metric table building: fills the state of ovms.metrics it is given (never imports it)."""
import array

# Definition letters (as metrics.tab's): TYPES indexes the value type, UNIT_CHARS the unit
# label (metrics.UNITS).
TYPES = "fibsvwDT"
UNIT_CHARS = "-%kVAWECHcsmSMdpgrnwah"

# The per-metric state of ovms.metrics that drop() releases.
_STATE = ("_ext", "_noff", "_order", "_fl", "_sp", "_dp", "_src", "_slot",
          "_val", "_tupd", "_mod", "_obj", "_ovr", "_xlat", "_dec")


def init(g, defs=None):
    """(Re)build the table held in g (the globals of ovms.metrics) from the definitions
    string (default: metrics.defs.DEFS)."""
    if defs is None:
        defs = g["_defs"]
        if defs is None:
            import ovms
            defs = g["_defs"] = ovms.load("metrics.defs").DEFS   # (in flash on the device)
            ovms.unload("metrics.defs")
    elif not defs.endswith("\n"):
        defs += "\n"                 # every name ends with a newline
    drop(g)
    n = defs.count("\n") + 8
    g["_std"] = defs
    g["_ext"] = ext = bytearray()
    g["_noff"] = noff = array.array("H", bytearray(2 * n))
    g["_order"] = order = array.array("H", bytearray(2 * n))
    g["_fl"] = fla = bytearray(n)
    g["_sp"] = spa = bytearray(n)
    g["_dp"] = dpa = bytearray(n)
    g["_src"] = array.array("h", b"\xff\xff" * n)
    g["_slot"] = array.array("H", b"\xff\xff" * n)
    g["_val"] = array.array("d")
    g["_tupd"] = array.array("i", bytearray(4 * n))
    g["_mod"] = bytearray(n)
    g["_obj"] = {}
    g["_ovr"] = {}
    g["_xlat"] = {}
    g["_stt"] = [0, 10, 120, 3600, 65535]
    g["_pdb"] = [0.0]
    g["_pmi"] = [0]
    g["_dec"] = None
    g["_derived"] = []
    g["_up_s"] = 0
    g["_up_rem"] = 0
    g["_up_last"] = g["_ms"]()
    vfind = g["_vfind"]
    # (bytes via a memoryview and 1-char slices: indexing a str would intern every letter)
    b = memoryview(defs)
    p = 0
    end = len(b)
    while p < end:
        e = defs.find("\n", p)
        if e < 0:
            e = end
        sp = defs.find(" ", p, e)
        if sp > p + 2 and b[p] != 35:        # "#": a comment line
            fl = TYPES.find(defs[p:p + 1])
            st = b[p + 1] - 48
            u = UNIT_CHARS.find(defs[p + 2:p + 3])
            if fl < 0 or u < 0 or not 0 <= st <= 4:
                raise ValueError("bad metric definition at %d" % p)
            for q in range(p + 3, sp):
                c = b[q]
                if c == 80:                 # "P"
                    fl |= 8                 # metrics._F_PERSIST
                elif c == 33:               # "!"
                    fl |= 16                # metrics._F_PRIO
                elif 48 <= c <= 57:         # a digit: display decimals
                    st |= (c - 47) << 8
            i = g["_n"]
            noff[i] = sp + 1
            fla[i] = fl
            spa[i] = st & 0xFF
            dpa[i] = st >> 8
            # keep _order sorted by name (the definitions usually are: append)
            j = vfind(order, noff, i, defs, ext, defs[sp + 1:e], e - sp - 1) & 0xFFFF
            k = i
            while k > j:
                order[k] = order[k - 1]
                k -= 1
            order[j] = i
            g["_n"] = i + 1
        p = e + 1


def drop(g):
    """Release all table storage held in g (for measurements and tests)."""
    g["_n"] = 0
    g["_std"] = ""
    for a in _STATE:
        g[a] = None
