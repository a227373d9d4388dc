"""``make run``'s process supervision: the Procfile's processes under supervisord.

honcho reads the Procfile and expands ``-c worker=N`` (process names ``worker.1`` ...,
``HONCHO_PROCESS_NAME`` and ``PORT`` per process, as ``honcho start`` does), so the Procfile
stays the one description of the processes. supervisord (the ``supervisor`` package, which
``honcho export supervisord`` also targets) runs them: a process that dies is started again
(with a growing delay while it keeps dying young) and the others keep running, where
``honcho start`` stops everything when one process exits. honcho's own export template is
not used: it stops with SIGQUIT (a cold shutdown for Celery, a quick one for gunicorn) and
logs to files, where ``make run`` wants SIGTERM's graceful stop and the output in its own.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from honcho.environ import expand_processes, parse, parse_procfile

from models.settings import Settings

GROUP = "relay"
# gunicorn.conf.py: graceful_timeout (plain HTTP requests may finish within it).
GUNICORN_GRACEFUL_S = 10.0
# What Celery's warm shutdown adds after the hand-off, and a margin.
STOP_MARGIN_S = 5.0
# A process that exits sooner than this after its start counts as a failed start: it is
# started again after 1 s, then 2 s, 3 s, ... and given up (FATAL) after this many failures.
START_SECS = 3
START_RETRIES = 10


@dataclass(frozen=True)
class Program:
    """One process to run: ``web.1``, ``worker.2``, ... as honcho names them."""

    name: str
    command: str
    port: int


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``make run ARGS=...``: the ``honcho start`` options that make sense here."""
    parser = argparse.ArgumentParser(prog="make run ARGS=", add_help=False)
    parser.add_argument("-c", "--concurrency", default="", metavar="process=num,...")
    parser.add_argument("processes", nargs="*", help="process types to run (default: all)")
    return parser.parse_args(argv)


def _concurrency(desc: str, known: Mapping[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in desc.split(","))):
        name, _, count = item.partition("=")
        if name not in known:
            raise SystemExit(f"relay: no process type {name!r} in the Procfile")
        counts[name] = int(count)
    return counts


def programs(procfile: Path, argv: list[str], port: int) -> list[Program]:
    """The processes ``honcho start -f procfile argv`` would start, with their names and
    ports (honcho gives the first type ``port``, the next ``port + 100``, ...)."""
    args = parse_args(argv)
    declared: dict[str, str] = dict(parse_procfile(procfile.read_text()).processes)
    chosen = {name: declared[name] for name in args.processes or declared if name in declared}
    if len(chosen) != len(args.processes or declared):
        raise SystemExit(f"relay: the Procfile has only {', '.join(declared)}")
    expanded = expand_processes(
        chosen, concurrency=_concurrency(args.concurrency, declared), port=port
    )
    return [Program(p.name, p.cmd, int(p.env["PORT"])) for p in expanded]


def dotenv(app_root: Path) -> dict[str, str]:
    """``.env`` in the project directory, which ``honcho start`` also loaded into every process."""
    path = app_root / ".env"
    return dict(parse(path.read_text())) if path.exists() else {}


def stop_wait_s(settings: Settings) -> float:
    """How long SIGTERM may take before SIGKILL: a worker's grace plus one heartbeat (the
    hand-off, docs/operations.md#graceful-shutdown) or gunicorn's graceful timeout, plus
    Celery's warm shutdown."""
    handoff = settings.shutdown_grace_s + settings.heartbeat_interval_s
    return max(handoff, GUNICORN_GRACEFUL_S) + STOP_MARGIN_S


def _escape(value: str) -> str:
    """supervisord expands ``%(name)s`` in its values: a literal ``%`` is written ``%%``."""
    return value.replace("%", "%%")


def _program_section(program: Program, app_root: Path, stop_wait: float) -> str:
    # The shell expands the Procfile's ${VAR:-default}s, then becomes the process (exec), so
    # supervisord's signals reach gunicorn or celery itself.
    command = shlex.join(["/bin/sh", "-c", f"exec {program.command}"])
    return f"""
[program:{program.name}]
command={_escape(command)}
directory={_escape(str(app_root))}
environment=HONCHO_PROCESS_NAME="{program.name}",PORT="{program.port}"
autostart=true
autorestart=true
startsecs={START_SECS}
startretries={START_RETRIES}
stopsignal=TERM
stopwaitsecs={int(stop_wait + 0.999)}
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile=/dev/stdout
stdout_logfile_maxbytes=0
"""


def render(programs: list[Program], app_root: Path, conf_dir: Path, stop_wait: float) -> str:
    """supervisord's configuration: in the foreground, its own log and every process's
    output on its stdout (which is ``make run``'s; its log is also kept in ``conf_dir``), all
    processes in one group so a stop signals them together."""
    head = f"""; Written by ops/supervise.py from the Procfile at every `make run`; edits are lost.
[supervisord]
; In the foreground supervisord also prints its log (spawned, exited, ...) on stdout.
nodaemon=true
logfile={_escape(str(conf_dir / "supervisord.log"))}
logfile_maxbytes=1MB
logfile_backups=2
loglevel=info
pidfile={_escape(str(conf_dir / "supervisord.pid"))}
childlogdir={_escape(str(conf_dir))}
"""
    sections = "".join(_program_section(p, app_root, stop_wait) for p in programs)
    group = f"\n[group:{GROUP}]\nprograms={','.join(p.name for p in programs)}\n"
    return head + sections + group


def write_config(
    argv: list[str], env: Mapping[str, str], app_root: Path, conf_dir: Path
) -> tuple[Path, list[Program]]:
    """Write ``conf_dir/supervisord.conf`` for the Procfile with ``make run``'s ARGS."""
    chosen = programs(app_root / "Procfile", argv, int(env["PORT"]))
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / "supervisord.conf"
    wait = stop_wait_s(Settings.from_env(env))
    path.write_text(render(chosen, app_root, conf_dir, wait))
    return path, chosen
