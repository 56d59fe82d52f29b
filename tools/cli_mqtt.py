"""ovms.py over MQTT: run shell commands on a module via <prefix>client/<cid>/command/<id>."""
import json
import os
import sys

import cli_link
from cli_link import CliError, quote  # noqa: F401  (quote: part of this module's interface)

FAIL_PREFIXES = ("Error", "Unrecognised command", "Usage:")
HISTORY = os.path.expanduser("~/.ovms_history")


def failed(reply):
    """True if a shell reply reports an error (exit code 1)."""
    return reply.lstrip().startswith(FAIL_PREFIXES)


def _line(args):
    if args.cmd in ("config", "metrics"):
        return args.cmd + " " + " ".join(quote(w) for w in args.words)
    return args.command


def _interactive(link):
    try:
        import readline
        try:
            readline.read_history_file(HISTORY)
        except OSError:
            pass
        readline.set_history_length(1000)
    except ImportError:
        readline = None
    print("Connected to %s:%d as %s (prefix %s). 'exit' or Ctrl-D to leave." % (
        link.host, link.port, link.cid, link.prefix))
    rc = 0
    try:
        while True:
            try:
                line = input("OVMS> ")
            except EOFError:
                print()
                break
            except KeyboardInterrupt:
                print()
                continue
            s = line.strip()
            if not s:
                continue
            if s in ("exit", "quit"):
                break
            r = link.command(s)
            if r is None:
                print("error: no response within %.0f s" % link.timeout, file=sys.stderr)
                rc = 1
            else:
                print(r)
    finally:
        if readline:
            try:
                readline.write_history_file(HISTORY)
            except OSError:
                pass
    return rc


def main(args):
    """Entry point from tools/ovms.py (shell and config over MQTT)."""
    line = _line(args)
    if line is None and args.json:
        print("error: --json needs a command (the interactive shell prints text)", file=sys.stderr)
        return 2
    try:
        link = cli_link.open_link(args)
    except CliError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    try:
        if line is None:
            return _interactive(link)
        r = link.command(line)
        if r is None:
            print("error: no response from the module within %.0f s (is it online? topic %scommand/...)"
                  % (args.timeout, link.base), file=sys.stderr)
            return 1
        if args.json:
            import cli_json
            print(json.dumps(cli_json.reply(line, r), indent=1, ensure_ascii=False))
        else:
            print(r)
        return 1 if failed(r) else 0
    except CliError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    finally:
        link.close()
