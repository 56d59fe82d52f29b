"""CAN acceptance filters covering a vehicle's frame ids (loaded when a bus opens, then dropped)."""


def cover(ids, slots, ext=False):
    """At most `slots` (id, mask) pairs that together accept every id in ids (and as few
    others as possible); [] for no ids. Pairs from merging the closest ids greedily."""
    full = 0x1FFFFFFF if ext else 0x7FF
    cl = []
    for i in ids:
        if (i, full) not in cl:
            cl.append((i & full, full))
    while len(cl) > slots > 0:
        best = None
        for a in range(len(cl)):
            ia, ma = cl[a]
            for b in range(a + 1, len(cl)):
                ib, mb = cl[b]
                m = ma & mb & ~(ia ^ ib) & full
                c = 0                   # bits the merged filter ignores
                x = full & ~m
                while x:
                    c += x & 1
                    x >>= 1
                if best is None or c < best[0]:
                    best = (c, a, b, ia & m, m)
        _, a, b, i, m = best
        cl.pop(b)
        cl[a] = (i, m)
    return cl


def filters(ids, slots, fext):
    """[(id, mask, flags)] for set_filters(): at most `slots` filters accepting every
    (id, extended) in ids, split between standard and extended ids by their share;
    fext: the controller's extended-id flag."""
    std = [i for i, e in ids if not e]
    ext = [i for i, e in ids if e]
    if std and ext:
        ns = max(1, slots * len(std) // (len(std) + len(ext)))
        ns = min(ns, slots - 1)
        return [(i, m, 0) for i, m in cover(std, ns)] + \
            [(i, m, fext) for i, m in cover(ext, slots - ns, True)]
    return [(i, m, fext if ext else 0) for i, m in cover(std or ext, slots, bool(ext))]


def text(f):
    """Filters for `can status`: "id/mask ..." in hex, "all" (None) or "none"."""
    if f is None:
        return "all"
    return " ".join(["%x/%x" % (i, m) for i, m, _ in f]) or "none"
