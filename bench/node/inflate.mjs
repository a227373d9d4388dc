// Compressed messages inflated on the main thread, as Python's websockets (and a browser's
// network stack) do, instead of on libuv's thread pool.
//
// ws inflates every compressed message with an async zlib stream: a round trip through a
// pool thread per message (and per 16 KB of output), two thread wake-ups that cost more CPU
// here than the inflate itself. In the catch-up workload (20 messages of ~12 KB per viewer,
// all compressed) that made the Node viewers spend twice the CPU of the Python ones.
//
// relay negotiates server_no_context_takeover, so each message is a deflate stream of its
// own: an unfragmented one is inflated alone with inflateRawSync, and its result handed to
// ws's receiver exactly as ws's own path hands it (from a later microtask, so the receiver is
// not re-entered). Anything else (context takeover, fragments, a zlib error, a message over
// maxPayload) takes ws's own path, which also produces ws's own close codes for bad data.

import zlib from "node:zlib";
import { PerMessageDeflate } from "ws";

const TRAILER = Buffer.from([0x00, 0x00, 0xff, 0xff]);
const kFragments = Symbol("fragments in ws's own inflater");
const wsDecompress = PerMessageDeflate.prototype.decompress;

function decompress(data, fin, callback) {
  const params = this.params || {};
  const inflateAlone =
    !this._isServer &&
    fin &&
    !this[kFragments] &&
    params.server_no_context_takeover === true;
  if (!inflateAlone) {
    this[kFragments] = !fin;
    return wsDecompress.call(this, data, fin, callback);
  }
  let out;
  try {
    const windowBits =
      typeof params.server_max_window_bits === "number" ? params.server_max_window_bits : zlib.constants.Z_DEFAULT_WINDOWBITS;
    out = inflateMessage(data, windowBits, this._maxPayload); // over maxPayload: ws's 1009
  } catch {
    return wsDecompress.call(this, data, fin, callback);
  }
  queueMicrotask(() => callback(null, out));
}

// One compressed message of a connection without context takeover, inflated alone (a
// message ends with a sync flush, not a final block; RFC 7692 drops its 00 00 ff ff tail).
export function inflateMessage(data, windowBits = zlib.constants.Z_DEFAULT_WINDOWBITS, maxOutput = 0) {
  const options = { windowBits, finishFlush: zlib.constants.Z_SYNC_FLUSH };
  if (maxOutput > 0) options.maxOutputLength = maxOutput;
  return zlib.inflateRawSync(Buffer.concat([data, TRAILER]), options);
}

export function inflateOnMainThread() {
  PerMessageDeflate.prototype.decompress = decompress;
}
