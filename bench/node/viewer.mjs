// What one WebSocket viewer received: seq continuity, exact text, and per-line latency.
// The counterpart of bench/viewer.py's Tally, rule for rule.
//
// A message is a single event (chunk, done, cancelled, error, resumed) or the batch form
// {"type": "chunks", "seq": 7, "texts": [...]} standing for chunk events with seq 7, 8, ...

import { createHash } from "node:crypto";
import { codePoints, pyInt } from "./common.mjs";

const TERMINALS = new Set(["done", "cancelled", "error"]);

export class Tally {
  // One viewer's account of one stream (stream index s, n lines expected).
  constructor(s, n, { parse = true } = {}) {
    this.s = s;
    this.n = n;
    this.parse = parse;
    this.seen = new Uint8Array(n);
    this.unique = this.dup = this.ooo = this.foreign = 0;
    this.lastI = -1;
    this.nextSeq = 1;
    this.seqGaps = this.seqDups = 0;
    this.msgs = this.chars = 0;
    this.sha = createHash("sha256");
    this.carry = "";
    this.terminal = null;
    this.errorEvent = null;
    this.firstLatUs = null;
    this.lastRecvUs = 0;
    this.closeCode = null;
    this.error = null;
    this.deflate = false; // the server's reply negotiated permessage-deflate
  }

  // Account for one message (a string) received at monotonic time t (µs).
  feed(raw, t, lat) {
    this.msgs += 1;
    const ev = JSON.parse(raw);
    const kind = ev.type;
    if (kind === "queued") return; // a queue notice: no seq, no event of the log
    const seq = ev.seq === undefined ? 0 : Math.trunc(Number(ev.seq));
    let texts;
    if (kind === "chunk") {
      texts = [ev.text];
    } else if (kind === "chunks") {
      texts = ev.texts;
    } else {
      if (this.seqOk(seq, 1) && TERMINALS.has(kind)) {
        this.terminal = kind;
        this.errorEvent = ev.error === undefined ? null : ev.error;
      }
      return;
    }
    if (!this.seqOk(seq, texts.length)) return;
    const text = texts.length === 1 ? texts[0] : texts.join("");
    if (typeof text !== "string") throw new TypeError(`chunk text is ${typeof text}`);
    this.chars += codePoints(text);
    this.sha.update(text, "utf8");
    this.lastRecvUs = t;
    if (this.parse) this.lines(text, t, lat);
  }

  // Check continuity; false for a message that repeats seqs already seen.
  seqOk(seq, count) {
    if (seq === this.nextSeq) {
      this.nextSeq += count;
      return true;
    }
    if (seq < this.nextSeq) {
      this.seqDups += count;
      return false;
    }
    this.seqGaps += seq - this.nextSeq;
    this.nextSeq = seq + count;
    return true;
  }

  lines(text, t, lat) {
    const buf = this.carry ? this.carry + text : text;
    let start = 0;
    let nl;
    while ((nl = buf.indexOf("\n", start)) !== -1) {
      this.line(buf, start, nl, t, lat);
      start = nl + 1;
    }
    this.carry = start === 0 ? buf : buf.slice(start);
  }

  // One line "<s>|<i>|<stamp>[|xx…]" (buf[start:end]), as bench/viewer.py reads it.
  line(buf, start, end, t, lat) {
    const a = buf.indexOf("|", start);
    const b = a === -1 || a >= end ? -1 : buf.indexOf("|", a + 1);
    if (b === -1 || b >= end) {
      this.foreign += 1;
      return;
    }
    let c = buf.indexOf("|", b + 1);
    if (c === -1 || c > end) c = end;
    const s = pyInt(buf.slice(start, a));
    const i = pyInt(buf.slice(a + 1, b));
    const stamp = pyInt(buf.slice(b + 1, c));
    if (Number.isNaN(s) || Number.isNaN(i) || Number.isNaN(stamp)) {
      this.foreign += 1;
      return;
    }
    if (s !== this.s || !(i >= 0 && i < this.n)) {
      this.foreign += 1;
      return;
    }
    if (this.seen[i]) {
      this.dup += 1;
    } else {
      this.seen[i] = 1;
      this.unique += 1;
    }
    if (i < this.lastI) this.ooo += 1;
    this.lastI = i;
    lat.push(t - stamp);
    if (i === 0) this.firstLatUs = t - stamp;
  }

  // Every line exactly once, in order, and no seq gap or repeat.
  get complete() {
    return this.unique === this.n && !(this.dup || this.ooo || this.foreign || this.seqGaps || this.seqDups);
  }

  shaHex() {
    return this.sha.copy().digest("hex");
  }
}
