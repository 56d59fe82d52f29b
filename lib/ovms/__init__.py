"""micro-ovms: OVMS-style vehicle module firmware for MicroPython."""
VERSION = "0.1.0"

# App hooks for the shell's commands (see ovms.shell): kept here so that the app installs
# them without loading the shell, which loads on the first command.
hooks = {}


def attr(attrs, a, drop=False):
    """The one lazy-loading pattern (asyncio's `_attrs`): a module's `__getattr__(a)` returns
    attr(_attrs, a), where _attrs maps a name to the submodule that defines it ("*": every
    other name). The submodule is imported on first access; drop=True unloads it again at
    once (the caller keeps what it got), else its owner drops it when convenient."""
    m = attrs.get(a) or attrs.get("*")
    if m is None:
        raise AttributeError(a)
    mod = load(m)
    if drop:
        unload(m)
    return getattr(mod, a)


def load(name):
    """The module ovms.<name> (e.g. "metrics.io"), imported on first use. Use this, not
    `from ovms.pkg import sub`, for a submodule of a package that has a module __getattr__
    (the import would ask that __getattr__ first)."""
    return __import__("ovms." + name, None, None, (1,))


def unload(name):
    """Drop the module ovms.<name> (e.g. "metrics.io") from RAM: from sys.modules and from
    its package's namespace (an import stores the submodule there). No error if not loaded."""
    import sys
    sys.modules.pop("ovms." + name, None)
    pkg, _, sub = name.rpartition(".")
    p = sys.modules.get("ovms." + pkg) if pkg else sys.modules.get("ovms")
    if p is not None:
        p.__dict__.pop(sub, None)
