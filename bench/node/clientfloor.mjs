// What any client pays to read one catch-up, without relay, sockets or a WebSocket library:
// the frames relay sends for it (bench/clientfloor.py writes them with relay's own encoder)
// are parsed, inflated, decoded and joined as bench/node/loadgen.mjs does, again and again
// in this one process. Prints one JSON object: CPU milliseconds per viewer for each step,
// cumulative, the median of ROUNDS rounds of REPS viewers each.
//
// usage: node clientfloor.mjs <frames file> [rounds] [reps]

import { readFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { inflateMessage } from "./inflate.mjs";

// The server-to-client frames of the file: [compressed?, payload] (unmasked, unfragmented).
function frames(buf) {
  const out = [];
  let at = 0;
  while (at < buf.length) {
    const first = buf[at];
    let size = buf[at + 1] & 0x7f;
    let head = 2;
    if (size === 126) {
      size = buf.readUInt16BE(at + 2);
      head = 4;
    } else if (size === 127) {
      size = Number(buf.readBigUInt64BE(at + 2));
      head = 10;
    }
    if ((first & 0x8f) !== 0x81) throw new Error(`not an unfragmented text frame at ${at}`);
    out.push([(first & 0x40) !== 0, buf.subarray(at + head, at + head + size)]);
    at += head + size;
  }
  return out;
}

// One viewer's catch-up, up to `step`: "inflate", "decode" (+ UTF-8, JSON.parse and the
// join of a chunks message's texts), "verify" (+ SHA-256 of the text, as the load
// generator checks it). Returns the characters read, so nothing is optimized away.
function viewer(msgs, step) {
  let chars = 0;
  const sha = step === "verify" ? createHash("sha256") : null;
  for (const [compressed, payload] of msgs) {
    const data = compressed ? inflateMessage(payload) : payload; // as the load generator inflates
    if (step === "inflate") {
      chars += data.length;
      continue;
    }
    const ev = JSON.parse(data.toString());
    const text = ev.type === "chunks" ? ev.texts.join("") : ev.text ?? "";
    chars += text.length;
    if (sha) sha.update(text, "utf8");
  }
  if (sha) sha.digest();
  return chars;
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const [file, roundsArg, repsArg] = process.argv.slice(2);
const msgs = frames(readFileSync(file));
const rounds = Number(roundsArg || 5);
const reps = Number(repsArg || 200);
const out = {
  messages: msgs.length,
  compressed: msgs.filter(([c]) => c).length,
  wire_bytes: msgs.reduce((n, [, p]) => n + p.length, 0),
  chars: viewer(msgs, "decode"),
  rounds,
  viewers_per_round: reps,
  ms_cpu_per_viewer: {},
};
for (const step of ["inflate", "decode", "verify"]) {
  const per = [];
  for (let r = 0; r < rounds; r++) {
    const c0 = process.cpuUsage();
    for (let k = 0; k < reps; k++) viewer(msgs, step);
    const c = process.cpuUsage(c0);
    per.push((c.user + c.system) / 1000 / reps);
  }
  out.ms_cpu_per_viewer[step] = Math.round(median(per) * 1000) / 1000;
}
console.log(JSON.stringify(out));
