"""Events: named happenings (system.start, network.up, ...) fanned out to listeners."""
_listeners = []


def listen(fn):
    """fn(name) is called for every event raised from now on."""
    if fn not in _listeners:
        _listeners.append(fn)


def raise_event(name):
    for fn in _listeners:
        try:
            fn(name)
        except Exception as e:  # a broken listener must not stop the others
            print("events: listener failed for", name, repr(e))
