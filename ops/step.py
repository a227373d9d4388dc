"""One line per set-up step of ``make run``, with its time::

    relay: [setup 3/3] installing Python packages (first run: about a minute) ... 41.7 s

Standard library only: the Makefile runs it with the Python that creates the virtualenv,
before anything is installed::

    python3 -m ops.step [--skip-if PATH] [--needs-python 3.11] setup 1/3 LABEL -- COMMAND...

On a terminal the time counts up in place while the step runs. Whatever the command prints
(pip is run with --quiet, so only warnings and errors) is shown as it comes, on lines of its
own. ops/run.py uses :class:`Step` for its own steps.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import threading
import time
from types import TracebackType
from typing import TextIO


class Step:
    """``relay: LABEL ... `` now, the time (or ``failed after ...``) when the block ends."""

    def __init__(self, label: str, out: TextIO | None = None) -> None:
        self.prefix = f"relay: {label} ... "
        self.label = label
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.open_line = False  # our line is on the screen without its end yet
        self.broken = False  # other output came in between: the end goes on a line of its own
        self.done = threading.Event()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __enter__(self) -> Step:
        self.started = time.monotonic()
        self._write(self.prefix)
        self.open_line = True
        if self.tty:
            threading.Thread(target=self._tick, daemon=True).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finish(f"{self.elapsed:.1f} s")
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            self.finish("stopped")
        else:
            self.finish(f"failed after {self.elapsed:.1f} s")

    def finish(self, result: str) -> None:
        """End the step's line with ``result`` (once)."""
        with self.lock:
            if self.done.is_set():
                return
            self.done.set()
            if self.broken:
                self._write(f"relay: {self.label}: {result}\n")
            else:
                self._write(("\r\033[K" + self.prefix if self.tty else "") + result + "\n")
            self.open_line = False

    def passthrough(self, data: bytes) -> None:
        """Show the command's own output, starting on a line of its own."""
        with self.lock:
            if self.open_line:  # (on a terminal, without the running time shown so far)
                self._write(("\r\033[K" + self.prefix if self.tty else "") + "\n")
                self.open_line = False
                self.broken = True
            self.out.flush()
            self.out.buffer.write(data)
            self.out.buffer.flush()

    def _tick(self) -> None:
        """On a terminal, show the running time after the label, once a second."""
        while not self.done.wait(1.0):
            with self.lock:
                if self.open_line and not self.done.is_set():
                    self._write(f"\r\033[K{self.prefix}{self.elapsed:.0f} s")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def run(label: str, command: list[str]) -> int:
    """Run ``command`` as one step; its output (stdout and stderr) is shown as it comes."""
    with Step(label) as step:
        try:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except OSError as exc:
            step.finish(f"failed: {exc}")
            return 127
        assert proc.stdout is not None
        chunk = os.read(proc.stdout.fileno(), 65536)
        while chunk:  # (no walrus: an old python3 must get as far as the version check)
            step.passthrough(chunk)
            chunk = os.read(proc.stdout.fileno(), 65536)
        code = proc.wait()
        if code != 0:
            step.finish(f"failed after {step.elapsed:.1f} s (exit status {code})")
            print(f"relay: the command was: {shlex.join(command)}", file=sys.stderr)
    return code


def _python_at_least(wanted: str) -> bool:
    need = tuple(int(part) for part in wanted.split("."))
    if sys.version_info[: len(need)] >= need:
        return True
    have = ".".join(str(part) for part in sys.version_info[:3])
    print(
        f"relay: Python {wanted} or newer is needed; {sys.executable} is {have}.\n"
        f"relay: name another interpreter, for example: make run PYTHON=python3.12",
        file=sys.stderr,
    )
    return False


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.step")
    parser.add_argument("--skip-if", metavar="PATH", help="say 'already there' if PATH exists")
    parser.add_argument("--needs-python", metavar="X.Y", help="refuse an older interpreter")
    parser.add_argument("phase", help="setup, start, ...")
    parser.add_argument("position", help="N/M")
    parser.add_argument("label")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    label = f"[{args.phase} {args.position}] {args.label}"
    if args.skip_if and os.path.exists(args.skip_if):
        print(f"relay: {label} ... already there", flush=True)
        return 0
    if args.needs_python and not _python_at_least(args.needs_python):
        return 1
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (after --)")
    try:
        return run(label, command)
    except KeyboardInterrupt:  # Ctrl-C: the command got it too; no traceback
        return 130


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
