"""dispatch: DISPATCH_N chats one after another, POST to the first chunk at the viewer, in
each of the two ways a client can start an answer, alternating (chat by chat, so both meet
the same moments of a noisy machine):

- post, then attach: POST /api/v1/chat (202), open the WebSocket for the returned streamId,
  read to the end (the figure and its breakdown, as before);
- streamed post: POST /api/v1/chat with ``Accept: text/event-stream``, read the ``turn``
  event and then the answer's events on the same response (``streamed``).

The figure is (first chunk received - POST start) - (upstream's first delta - its request
arrival): what relay adds in front of the generator. The first DISPATCH_WARMUP chats of each
way are run but not counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.loadgen_runs import STREAMED
from bench.runner import Ctx, relay_stack
from bench.stack import Sizing
from bench.stats import summarize
from bench.upstream_stream import plan_message

TTFT_RATE = 10_000.0  # deltas/s after the first, when DISPATCH_TTFT_MS delays it
WHAT = "(first chunk at the viewer - POST start) - (upstream first delta - its request arrival)"
PARTS = {
    "post_ms": ("post_end_us", "post_start_us"),
    "ws_connect_ms": ("ws_open_us", "ws_start_us"),
    "worker_pickup_ms": ("arrived_us", "post_end_us"),
    "upstream_delay_ms": ("first_us", "arrived_us"),
    "upstream_to_viewer_ms": ("first_chunk_us", "first_us"),
}
STREAMED_PARTS = {
    "turn_event_ms": ("turn_us", "post_start_us"),
    "post_to_upstream_ms": ("arrived_us", "post_start_us"),
    "upstream_delay_ms": ("first_us", "arrived_us"),
    "upstream_to_viewer_ms": ("first_chunk_us", "first_us"),
}


async def run(ctx: Ctx) -> dict[str, np.ndarray]:
    """Run the chats one after another and time each against the upstream's records."""
    k = ctx.knobs
    total = 2 * (k.dispatch_n + k.dispatch_warmup)  # each way, alternating
    ctx.out["config"] = {"chats": k.dispatch_n, "warmup": k.dispatch_warmup,
                         "chunks_per_chat": k.dispatch_chunks, "sequential": True,
                         "ttft_ms": k.dispatch_ttft_ms,
                         "ways": ["post, then attach", "streamed post"]}  # fmt: skip
    # At once: every delta in one write. With a time to the first delta: then 10,000/s.
    rate = TTFT_RATE if k.dispatch_ttft_ms > 0 else 0
    items = [{"s": s, "n": k.dispatch_chunks, "flow": STREAMED if s % 2 else "ws",
              "message": plan_message(s, k.dispatch_chunks, rate, k.dispatch_ttft_ms,
                                      False, False)}
             for s in range(total)]  # fmt: skip
    async with relay_stack(ctx, Sizing(16, 1, 1)) as stack:
        assert stack.api is not None and stack.upstream is not None and stack.meter is not None
        stack.meter.start()
        reply = await stack.loadgens[0].call(
            "dispatch", timeout=total * 30 + 60,
            args={"http_url": stack.api.base, "ws_url": stack.api.ws_base,
                  "token": stack.api.token, "items": items, "timeout_s": 30},
        )  # fmt: skip
        meter = stack.meter.stop()
        up = (await stack.upstream.stats())["streams"]
    rows = [join(r, up.get(str(r["s"]))) for r in reply["results"][2 * k.dispatch_warmup :]]
    arrays = describe(ctx.out["results"], [r for r in rows if r["s"] % 2 == 0], meter)
    streamed: dict[str, Any] = {}
    ctx.out["results"]["streamed"] = streamed
    arrays.update(describe_streamed(streamed, [r for r in rows if r["s"] % 2]))
    return arrays


def join(row: dict[str, Any], up: dict[str, Any] | None) -> dict[str, Any]:
    """Add the upstream's arrival and first-delta times to one chat's timestamps."""
    if up is None or row.get("error") or not row.get("first_chunk_us"):
        return {**row, "ok": False}
    return {**row, "arrived_us": up["arrived_us"], "first_us": up["first_us"], "ok": True}


def describe(
    res: dict[str, Any], rows: list[dict[str, Any]], meter: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Summarize relay's own delay and its parts; return the samples to plot."""
    ok = [r for r in rows if r["ok"]]
    adjusted = np.asarray([((r["first_chunk_us"] - r["post_start_us"])
                            - (r["first_us"] - r["arrived_us"])) / 1000 for r in ok])  # fmt: skip
    res["adjusted_ms"] = summarize(adjusted)
    res["what"] = WHAT
    res["raw_first_chunk_ms"] = summarize([(r["first_chunk_us"] - r["post_start_us"]) / 1000
                                           for r in ok])  # fmt: skip
    arrays = {"relay's own delay": adjusted}
    breakdown = {}
    for name, (end, start) in PARTS.items():
        values = np.asarray([(r[end] - r[start]) / 1000 for r in ok])
        breakdown[name] = summarize(values)
        arrays[name.removesuffix("_ms").replace("_", " ")] = values
    res["breakdown_ms"] = breakdown
    res["chats_ok"] = len(ok)
    res["chats_failed"] = len(rows) - len(ok)
    res["error_samples"] = [r.get("error") for r in rows if not r["ok"]][:3]
    res["every_chat_complete"] = all(r.get("complete") for r in ok) and len(ok) == len(rows)
    res["close_codes"] = sorted({str(r.get("close_code")) for r in rows})
    res["processes"] = meter["procs"]
    res["other_processes_cpu_pct"] = meter["others_cpu_pct"]
    return arrays


def describe_streamed(res: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The same figure for the streamed posts, and its parts."""
    ok = [r for r in rows if r["ok"]]
    adjusted = np.asarray([((r["first_chunk_us"] - r["post_start_us"])
                            - (r["first_us"] - r["arrived_us"])) / 1000 for r in ok])  # fmt: skip
    res["what"] = "Accept: text/event-stream on the POST; " + WHAT
    res["adjusted_ms"] = summarize(adjusted)
    res["breakdown_ms"] = {
        name: summarize([(r[end] - r[start]) / 1000 for r in ok])
        for name, (end, start) in STREAMED_PARTS.items()
    }
    res["chats_ok"] = len(ok)
    res["chats_failed"] = len(rows) - len(ok)
    res["error_samples"] = [r.get("error") for r in rows if not r["ok"]][:3]
    res["every_chat_complete"] = all(r.get("complete") for r in ok) and len(ok) == len(rows)
    return {"streamed post: relay's own delay": adjusted}
