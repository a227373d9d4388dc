"""What any client pays to read one catch-up: the floor under the ``catchup`` crowds.

Run by ``python -m bench clientfloor`` (not in the default suite) with the code under test's
own interpreter (``python -m bench.clientfloor`` from that checkout's root); prints one JSON
object.

relay's own encoder (``web.frames``) builds the WebSocket frames a viewer that negotiated
permessage-deflate receives for a catch-up of CATCHUP_CHUNKS events in blocks of
RELAY_CATCHUP_BATCH, with the load generator's lines of CHUNK_CHARS characters;
bench/node/clientfloor.mjs then reads them as bench/node/loadgen.mjs does (inflate, decode,
join, then SHA-256 as the load generator checks the text), over and over in one Node
process, and reports the CPU it spent per viewer. No socket, no WebSocket library and no
relay process take part, so this is less than any client pays; and one load generator
process reads a crowd's catch-ups one after another, so a crowd of N viewers in one such
process cannot all have read theirs sooner than N times this after they connected.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.upstream_stream import line
from models.events import CHUNK
from web.frames import Batch, Deflate

NODE_SCRIPT = Path(__file__).resolve().parent / "node" / "clientfloor.mjs"


def catchup_frames(chunks: int, block: int, width: int, deflate: Deflate | None) -> bytes:
    """Every frame a batch-form viewer gets for a catch-up from seq 0, block by block."""
    stamp = 1_000_000_000  # a monotonic µs stamp of the size the benchmarks write
    out = []
    for first in range(1, chunks + 1, block):
        seqs = range(first, min(first + block, chunks + 1))
        texts = [line(0, seq - 1, stamp + 37 * seq, width) for seq in seqs]
        out.append(Batch(first, [CHUNK] * len(texts), texts).ws_bytes(True, deflate))
    return b"".join(out)


def main() -> dict[str, Any]:
    chunks = int(os.environ.get("CATCHUP_CHUNKS") or 10_000)
    block = int(os.environ.get("RELAY_CATCHUP_BATCH") or 500)
    width = int(os.environ.get("CHUNK_CHARS") or 20)
    node = shutil.which("node")
    if node is None:
        raise SystemExit("bench/clientfloor.py needs node on PATH")
    result: dict[str, Any] = {"chunks": chunks, "block": block, "chunk_chars": width}
    with tempfile.TemporaryDirectory(prefix="relay-clientfloor-") as tmp:
        for name, deflate in (("deflate", Deflate()), ("plain", None)):
            path = Path(tmp) / f"{name}.frames"
            path.write_bytes(catchup_frames(chunks, block, width, deflate))
            done = subprocess.run(
                [node, str(NODE_SCRIPT), str(path)], capture_output=True, text=True, check=True
            )
            result[name] = json.loads(done.stdout)
    return result


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
    print()
