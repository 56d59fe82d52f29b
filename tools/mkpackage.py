"""mkpackage: write package.json so `mpremote mip install github:OWNER/REPO` installs the app."""
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deploy  # noqa: E402


def package(source=REPO):
    """The package.json dict: every file of lib/ (installed into the device's /lib)."""
    with open(os.path.join(source, "lib", "ovms", "__init__.py")) as f:
        m = re.search(r'^VERSION\s*=\s*["\']([^"\']+)', f.read(), re.M)
    return {
        "urls": [[rel, "lib/" + rel] for rel in deploy.lib_files(os.path.join(source, "lib"))],
        "deps": [],
        "version": m.group(1) if m else "0.0.0",
    }


def text(source=REPO):
    """package.json text: one file per line."""
    p = package(source)
    urls = ",\n".join("    " + json.dumps(u) for u in p["urls"])
    return '{\n  "urls": [\n%s\n  ],\n  "deps": [],\n  "version": %s\n}\n' % (
        urls, json.dumps(p["version"]))


def run(a):
    """`ovms.py package [--check]`: write (or check) package.json."""
    path = os.path.join(REPO, "package.json")
    new = text()
    old = open(path).read() if os.path.exists(path) else ""
    if a.check:
        if old != new:
            print("package.json is out of date: run: make package", file=sys.stderr)
            return 1
        return 0
    if old != new:
        with open(path, "w") as f:
            f.write(new)
        print("package.json: %d files" % len(package()["urls"]))
    return 0

