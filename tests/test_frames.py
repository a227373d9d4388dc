"""Wire encodings, in-process: the batch form's grouping, WebSocket framing, shared deflate."""

from __future__ import annotations

import json
import zlib

from models.events import CANCELLED, CHUNK, DONE, RESUMED, Event, batch_messages
from web.frames import Batch, Deflate, encode_ws, ws_frame
from web.websocket import add_no_server_context_takeover


def chunk(seq: int, text: str = "x") -> Event:
    return Event(seq, CHUNK, text=text)


def test_runs_of_chunks_become_one_message_and_other_events_stay_alone() -> None:
    events = [
        chunk(1, "a"),
        chunk(2, "b"),
        chunk(3, "c"),
        Event(4, CANCELLED),
        Event(5, RESUMED, attempt=2),
        chunk(6, "d"),
        chunk(7, 'é\n"q"'),
        Event(8, DONE, message_id="m"),
    ]
    messages = batch_messages(events)
    assert [(m.first, m.last, m.type) for m in messages] == [
        (1, 3, "chunks"), (4, 4, "cancelled"), (5, 5, "resumed"), (6, 7, "chunks"),
        (8, 8, "done"),
    ]  # fmt: skip
    assert json.loads(messages[0].json) == {"type": "chunks", "seq": 1, "texts": ["a", "b", "c"]}
    assert json.loads(messages[3].json)["texts"] == ["d", 'é\n"q"']
    assert messages[4].json == events[-1].json
    assert messages[0].to_sse().startswith("id: 3\nevent: chunks\ndata: {")


def test_a_lone_chunk_travels_as_itself() -> None:
    (message,) = batch_messages([chunk(9, "solo")])
    assert message.type == "chunk" and message.json == chunk(9, "solo").json


def test_batch_since_cuts_at_the_cursor() -> None:
    batch = Batch.of([chunk(s) for s in range(5, 10)])
    assert batch.since(3) is batch and batch.since(4) is batch
    part = batch.since(6)
    assert part is not None and [e.seq for e in part.events] == [7, 8, 9]
    assert batch.since(9) is None and batch.since(12) is None


def test_frame_lengths_use_the_right_header() -> None:
    for size, header in ((0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)):
        frame = ws_frame(b"x" * size)
        assert len(frame) == size + header
        assert frame[0] == 0x81  # FIN, text, not compressed
    assert ws_frame(b"abc", compressed=True)[0] == 0xC1  # RSV1 set


def test_small_messages_go_uncompressed_large_ones_deflate_alone() -> None:
    deflate = Deflate(window_bits=15, min_bytes=100)
    small = batch_messages([chunk(1, "hi")])[0]
    assert encode_ws(small, deflate) == ws_frame(small.json.encode())
    large = batch_messages([chunk(s, "token ") for s in range(1, 200)])[0]
    frame = encode_ws(large, deflate)
    assert frame[0] == 0xC1
    payload = frame[2:] if frame[1] < 126 else frame[4:]
    # No context takeover: a fresh decompressor reads it, whatever came before.
    inflated = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
    assert inflated == large.json.encode()


def test_a_batch_encodes_once_per_form() -> None:
    batch = Batch.of([chunk(1), chunk(2)])
    assert batch.ws_bytes(True, None) is batch.ws_bytes(True, None)
    assert batch.ws_bytes(False, None) == ws_frame(chunk(1).json.encode()) + ws_frame(
        chunk(2).json.encode()
    )
    assert batch.sse_text(True).count("event: chunks") == 1


def test_the_offer_is_rewritten_to_keep_no_server_context() -> None:
    offer = "permessage-deflate; client_max_window_bits, x-webkit-deflate-frame"
    assert add_no_server_context_takeover(offer) == (
        "permessage-deflate; client_max_window_bits; server_no_context_takeover, "
        "x-webkit-deflate-frame"
    )
    done = "permessage-deflate; server_no_context_takeover"
    assert add_no_server_context_takeover(done) == done


def test_chunk_runs_encode_exactly_as_events_do() -> None:
    texts = ["plain", 'quote " and \\ backslash', "é ü 漢字 😀", "\n\t\x00", "\u2028 line sep", ""]
    events = [chunk(seq, text) for seq, text in enumerate(texts, start=41)]
    batch = Batch.of(events)
    assert [m.json for m in batch.messages(False)] == [e.json for e in events]
    (message,) = batch.messages(True)
    assert json.loads(message.json) == {"type": "chunks", "seq": 41, "texts": texts}
    mixed = Batch.of([*events[:2], Event(43, DONE, message_id="m")])
    assert [m.json for m in mixed.messages(False)] == [e.json for e in mixed.events]
