"""What commands print on stdout: the ``--json`` contract, and a reader that went away.

**``--json``.** A command that ends prints exactly ONE JSON document: an object (never a bare
list, never one object per line) whose lists sit under plural nouns (``{"streams": [...]}``,
``{"dead_letters": [...], "total": 12}``), times as ISO 8601 UTC text, tokens masked
(:func:`pipeline.redact.mask`). Commands that never end (``tail``, ``lag --watch``, ``top``)
print one such object per line instead (:func:`print_json_line`), so ``jq`` reads them as they
come. Errors go to stderr with a non-zero exit code, never into the document.

**A closed stdout** (``blynk-bridge dead list | head``, a ``tee`` killed by the same Ctrl-C) is
not an error of the command: :func:`stdout_closed` points stdout at ``/dev/null`` so nothing
more fails (not even the interpreter's last flush), and the command line exits with
:data:`EXIT_PIPE` without a traceback, as a process killed by ``SIGPIPE`` would.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

#: 128 + SIGPIPE: what a shell reports for a writer whose reader went away.
EXIT_PIPE = 141


def _dumps(doc: Mapping[str, Any], indent: int | None) -> str:
    return json.dumps(doc, indent=indent, ensure_ascii=False, default=str)


def print_json(doc: Mapping[str, Any]) -> None:
    """The one JSON document of a command that ends (see the module docstring)."""
    sys.stdout.write(_dumps(doc, 2) + "\n")
    sys.stdout.flush()


def print_json_line(doc: Mapping[str, Any]) -> None:
    """One compact JSON object on its own line, flushed at once (commands that never end)."""
    sys.stdout.write(_dumps(doc, None) + "\n")
    sys.stdout.flush()


def stdout_closed() -> None:
    """The reader of stdout went away: send what is still buffered, and anything printed later,
    to ``/dev/null``, so that no later write or the interpreter's exit raises again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def say(text: str) -> bool:
    """Print a line and flush it; ``False`` (and stdout silenced) when stdout's reader is gone.

    For output that must not stop the work behind it (the demo's progress lines): the demo
    still stops the pipeline and removes its keys when ``tee`` died first.
    """
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_closed()
        return False
    return True
