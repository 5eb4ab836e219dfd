"""
C{tests/support/backend.py}, plus a stamp file saying when it began and when it listened.

Used by C{bench/run.py} as the command of Hestia's cold-start service::

    python bench/stamped_backend.py --stamp FILE --port 8003 --start-delay 0.5

Every argument after C{--stamp FILE} goes to C{tests/support/backend.py} unchanged.
Once the backend listens, C{FILE} holds C{{"pid", "began", "listening"}}:
C{began} is the wall-clock time this script's first line ran (after the
interpreter started), C{listening} the time its socket began listening.
"""

from __future__ import annotations

import time

BEGAN = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

import backend  # type: ignore[import-not-found]  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--stamp":
        sys.stderr.write("usage: stamped_backend.py --stamp FILE [backend.py options]\n")
        return 2
    stamp, rest = Path(argv[1]), argv[2:]
    say = backend.say

    def stamped_say(line: str, fd: int = 1) -> None:
        if line.startswith("listening on"):
            data = {"pid": os.getpid(), "began": BEGAN, "listening": time.time()}
            partial = stamp.with_name(stamp.name + ".tmp")
            partial.write_text(json.dumps(data), encoding="ascii")
            os.replace(partial, stamp)
        say(line, fd)

    backend.say = stamped_say
    return int(backend.main(rest))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
