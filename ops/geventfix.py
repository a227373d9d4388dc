"""Repair what gevent's monkey-patching missed in Celery's worker.

``celery worker --pool gevent`` calls ``gevent.monkey.patch_all()`` before it imports
anything else. While ``patch_all`` patches ``threading`` it looks at every existing object to
find locks, and one of Celery's lazy proxies imports ``celery._state`` when asked for its
class: that imports kombu, whose ``kombu.utils.functional`` runs ``from time import sleep``
before ``time`` is patched. kombu then retries a lost broker connection with the blocking
``time.sleep``, which froze the whole worker (every generation, every heartbeat) for each
back-off step while Redis was down: 6 s in a 4 s outage. This points such early imports at
gevent's versions; it does nothing when the process is not patched.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("relay.worker")

# (module, name bound at import, the patched module and attribute it should be)
EARLY_BINDINGS = (
    ("kombu.utils.functional", "sleep", "time", "sleep"),
    ("kombu.resource", "LifoQueue", "queue", "LifoQueue"),
)


def repair_early_imports() -> list[str]:
    """Rebind what was imported before gevent patched it; return what was repaired."""
    try:
        import gevent.monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return []
    repaired = []
    for module_name, name, source, attr in EARLY_BINDINGS:
        module = sys.modules.get(module_name)
        if module is None or not gevent.monkey.is_module_patched(source):
            continue
        if getattr(module, name, None) is gevent.monkey.get_original(source, attr):
            setattr(module, name, getattr(sys.modules[source], attr))
            repaired.append(f"{module_name}.{name}")
    if repaired:
        log.info("gevent: rebound %s to the patched versions", ", ".join(repaired))
    return repaired
