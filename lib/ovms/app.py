"""The micro-ovms application: starts and supervises the module's tasks."""
import asyncio


async def _idle():
    while True:
        await asyncio.sleep(1)


def main():
    try:
        asyncio.run(_idle())
    except KeyboardInterrupt:
        print("micro-ovms stopped (Ctrl-C); REPL ready")
    finally:
        asyncio.new_event_loop()
