"""``modules.errors`` stand-in: ``report`` / ``display`` print the message (and the traceback)."""

import traceback


def report(message, *, exc_info=False):
    print(message)
    if exc_info:
        traceback.print_exc()


def display(e, task, *, full_traceback=False):
    print(f"{task or 'error'}: {type(e).__name__}: {e}")
