"""lib/ has no import cycle between its modules at import time: module-level import statements,
and modules loaded by calls that run at import (ovms.load("x.y"), ovms.attr(...), a module's
own __getattr__ through its _attrs). Imports inside functions are on demand, once both
modules are initialised, and are not edges."""
import ast
import os

LIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib")


def _modules(lib):
    mods = {}
    for root, _, files in os.walk(lib):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(root, f)
                name = os.path.relpath(p, lib)[:-3].replace(os.sep, ".")
                if name.endswith(".__init__"):
                    name = name[:-9]
                mods[name] = p
    return mods


def _toplevel(body):
    # module-level statements, including those in if/try/with blocks (not in def/class)
    for st in body:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        yield st
        for field in ("body", "orelse", "finalbody", "handlers"):
            sub = getattr(st, field, None)
            if isinstance(sub, list):
                yield from _toplevel(sub)


def _imports(name, path, mods):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    attrs = set()       # the modules a module's __getattr__ loads (its _attrs values)
    for st in tree.body:
        if isinstance(st, ast.Assign) and any(getattr(t, "id", "") == "_attrs" for t in st.targets):
            attrs = {"ovms." + c.value for c in ast.walk(st.value)
                     if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    out = set()
    for st in _toplevel(tree.body):
        if not isinstance(st, (ast.Import, ast.ImportFrom)):
            for c in ast.walk(st):
                if isinstance(c, ast.Call):
                    if getattr(c.func, "id", "") == "__getattr__":
                        out |= attrs & set(mods)
                    for k in ast.walk(c):       # ovms.load("metrics.io"), ovms.attr(...)
                        if isinstance(k, ast.Constant) and isinstance(k.value, str) \
                                and "ovms." + k.value in mods:
                            out.add("ovms." + k.value)
        if isinstance(st, ast.Import):
            for a in st.names:
                if a.name in mods:
                    out.add(a.name)
        elif isinstance(st, ast.ImportFrom):
            base = st.module or ""
            if st.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - st.level + 1] + ([base] if base else []))
            for a in st.names:
                sub = base + "." + a.name       # `from pkg import submodule`
                if sub in mods:
                    out.add(sub)
                elif base in mods:
                    out.add(base)
    out.discard(name)
    return out


def _cycles(graph):
    # every strongly connected component of more than one module (Tarjan)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_lib_has_no_import_cycle(lib=LIB):
    mods = _modules(lib)
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert "ovms.metrics" in graph["ovms.metrics.tab"]      # (the checker sees the imports)
    assert "ovms.metrics.build" in graph["ovms.metrics"]    # (and the loads at import)
    assert _cycles(graph) == []
