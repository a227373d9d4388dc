// Fake OpenAI-compatible chat-completions server (node bench/node/upstream.mjs [--chunk-chars N]).
//
// The counterpart of bench/upstream.py and bench/upstream_stream.py, on Node's built-in http
// module: the same routes, the same SSE stream byte for byte (chunked, keep-alive), the same
// plan message, stamps, records and control endpoints. It prints "PORT <n>" on stdout once
// it listens. The orchestrator steers it through /control/*: go starts gated streams, release
// ends held ones, count and stats report what was written and when, clock reads the clock.
//
// Each delta's content is one line padded to CHUNK_CHARS, as in the peer's harness:
// "<stream idx>|<i>|<producer monotonic µs>|xx…\n", stamped right when it is written.

import http from "node:http";
import { createHash } from "node:crypto";
import { log, nowUs, summarize } from "./common.mjs";

// A held response sends an SSE comment this often, as real servers do while a model thinks:
// relay's provider gives up on an upstream that is silent for RELAY_OPENAI_TIMEOUT_S (60 s).
const KEEPALIVE_MS = 10_000;
// What the orchestrator posts as the user message; the upstream reads its plan from it.
const PLAN = /bench s=(\d+) n=(\d+) rate=([\d.]+) offset_ms=([\d.]+) hold=([01]) gate=([01])/;
// Unpaced streams hand this many events to the socket per write.
const UNPACED_BATCH = 32;
// Python's asyncio transports pause a writer above 64 KiB buffered: the same here.
const HIGH_WATER = 64 * 1024;

const head = () =>
  `data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":${Math.floor(Date.now() / 1000)},` +
  `"model":"bench","choices":[{"index":0,"delta":`;

// Find the plan in the newest user message, or null.
function parsePlan(messages) {
  if (!Array.isArray(messages)) return null;
  for (let k = messages.length - 1; k >= 0; k--) {
    const m = messages[k];
    if (!m || m.role !== "user") continue;
    const hit = PLAN.exec(String(m.content ?? ""));
    if (hit) {
      const [, s, n, rate, off, hold, gate] = hit;
      return { s: Number(s), n: Number(n), rate: Number(rate), offsetMs: Number(off), hold: hold === "1", gate: gate === "1" };
    }
  }
  return null;
}

// Chunk i of stream s stamped t, padded to `width` characters (peer format).
function line(s, i, t, width) {
  const base = `${s}|${i}|${t}`;
  const room = width - base.length - 1;
  return room <= 0 ? base + "\n" : base + "|" + "x".repeat(room - 1) + "\n";
}

// The SSE event carrying one delta of content. Lines hold digits, "|" and "x": only the
// newline needs JSON escaping.
function contentEvent(text) {
  const body = text.endsWith("\n") ? text.slice(0, -1) + "\\n" : text;
  return `${head()}{"content":"${body}"},"finish_reason":null}]}\n\n`;
}

// The first SSE event, which only names the role.
const roleEvent = () => `${head()}{"role":"assistant","content":""},"finish_reason":null}]}\n\n`;

// The finish chunk, the usage chunk and [DONE], as OpenAI sends them.
function closingEvents(produced) {
  const h = head();
  const usage = `{"prompt_tokens":12,"completion_tokens":${produced},"total_tokens":${produced + 12}}`;
  const stop = `${h}{},"finish_reason":"stop"}]}\n\n`;
  const tail = h.split('"choices"')[0] + `"choices":[],"usage":${usage}}\n\n`;
  return stop + tail + "data: [DONE]\n\n";
}

// What the upstream did for one stream (times in monotonic µs).
class Record {
  constructor(plan, arrivedUs) {
    this.plan = plan;
    this.arrivedUs = arrivedUs;
    this.firstUs = 0;
    this.lastUs = 0;
    this.doneUs = 0;
    this.produced = 0;
    this.chars = 0;
    this.disconnected = false;
    this.sha = createHash("sha256");
  }

  asJson() {
    return {
      arrived_us: this.arrivedUs,
      first_us: this.firstUs,
      last_us: this.lastUs,
      done_us: this.doneUs,
      produced: this.produced,
      chars: this.chars,
      sha256: this.sha.copy().digest("hex"),
      disconnected: this.disconnected,
    };
  }
}

// One response being written: gone once relay's connection has closed.
class Gone extends Error {}

// One timer for every paced stream: a min-heap of (due µs, callback). On each wake-up it runs
// every callback already due, in due order, and sleeps until the next one. Timers have 1 ms
// granularity and may fire a little short of it: nothing runs before its due time then (the
// timer is armed again), as asyncio's sleep, which rounds up to the millisecond, never does.
class Pacer {
  constructor() {
    this.heap = [];
    this.timer = null;
    this.armedFor = Infinity;
    this.tick = () => this.run();
  }

  at(due, fn) {
    const h = this.heap;
    let k = h.length;
    h.push({ due, fn });
    while (k > 0) {
      const up = (k - 1) >> 1;
      if (h[up].due <= due) break;
      h[k] = h[up];
      k = up;
    }
    h[k] = { due, fn };
    if (due < this.armedFor) this.arm();
  }

  pop() {
    const h = this.heap;
    const top = h[0];
    const last = h.pop();
    const n = h.length;
    if (n) {
      let k = 0;
      for (;;) {
        const l = 2 * k + 1;
        if (l >= n) break;
        const m = l + 1 < n && h[l + 1].due < h[l].due ? l + 1 : l;
        if (h[m].due >= last.due) break;
        h[k] = h[m];
        k = m;
      }
      h[k] = last;
    }
    return top;
  }

  arm() {
    clearTimeout(this.timer);
    this.timer = null;
    this.armedFor = Infinity;
    if (!this.heap.length) return;
    this.armedFor = this.heap[0].due;
    this.timer = setTimeout(this.tick, Math.max(1, Math.ceil((this.armedFor - nowUs()) / 1000)));
  }

  run() {
    this.timer = null;
    this.armedFor = Infinity;
    while (this.heap.length && this.heap[0].due <= nowUs()) this.pop().fn();
    this.arm();
  }
}

const pacer = new Pacer();

// Writes one stream's deltas to its response, paced or as fast as the socket takes them.
class Emitter {
  constructor(res, rec, width, lag) {
    this.res = res;
    this.rec = rec;
    this.width = width;
    this.lag = lag;
    this.sock = null; // set once the head has gone out through res.write
    this.closed = false;
    this.ended = false;
    res.on("close", () => {
      this.closed = true;
      if (!this.ended) rec.disconnected = true;
    });
  }

  emit(i, t) {
    const text = line(this.rec.plan.s, i, t, this.width);
    const rec = this.rec;
    rec.produced += 1;
    rec.chars += text.length; // ASCII
    rec.sha.update(text);
    if (!rec.firstUs) rec.firstUs = t;
    rec.lastUs = t;
    return contentEvent(text);
  }

  // Write one HTTP chunk; wait while the socket's buffer is above the high-water mark (as
  // asyncio's drain does). The head and the first event go through res.write; later chunks
  // go straight to the socket, framed as res.write frames them (size, CRLF, data, CRLF), which
  // spares Node's per-write bookkeeping of the response; res.end() then writes the last
  // chunk and the terminating one after them, on the same socket.
  async write(data) {
    if (this.closed) throw new Gone();
    let ok;
    if (this.sock !== null) {
      ok = this.sock.write(`${Buffer.byteLength(data).toString(16)}\r\n${data}\r\n`);
    } else {
      ok = this.res.write(data);
      this.sock = this.res.socket; // null while an earlier response holds the connection
    }
    if (!ok) {
      const target = this.sock || this.res;
      await new Promise((resolve) => {
        const done = () => {
          target.off("drain", done);
          this.res.off("close", done);
          resolve();
        };
        target.on("drain", done);
        this.res.on("close", done);
      });
      if (this.closed) throw new Gone();
    }
  }

  // Write chunk i at base + offset + i * period (monotonic), recording the lag.
  paced(baseUs) {
    const plan = this.rec.plan;
    const periodUs = 1e6 / plan.rate;
    const start = baseUs + plan.offsetMs * 1000;
    return new Promise((resolve, reject) => {
      let i = 0;
      let due = Math.trunc(start);
      const next = () => {
        if (i >= plan.n) return resolve();
        due = Math.trunc(start + i * periodUs);
        if (due <= nowUs()) step();
        else pacer.at(due, step);
      };
      const step = () => {
        if (this.closed) return reject(new Gone());
        const t = nowUs();
        this.lag.push(t - due);
        const written = this.write(this.emit(i, t));
        i += 1;
        written.then(next, reject);
      };
      next();
    });
  }

  // Write every chunk as fast as the socket takes them, many events per write.
  async unpaced() {
    const n = this.rec.plan.n;
    for (let start = 0; start < n; start += UNPACED_BATCH) {
      if (this.closed) throw new Gone();
      let events = "";
      const end = Math.min(n, start + UNPACED_BATCH);
      for (let i = start; i < end; i++) events += this.emit(i, nowUs());
      await this.write(events);
      await new Promise(setImmediate); // let the other unpaced streams take their turn
    }
  }
}

// The server's state: stream records, the go and release signals, pacing lag.
class Upstream {
  constructor(width) {
    this.width = width;
    this.goUs = 0;
    this.goSet = false;
    this.go = new Promise((resolve) => {
      this.fireGo = resolve;
    });
    this.released = false;
    this.release = new Promise((resolve) => {
      this.fireRelease = resolve;
    });
    this.records = new Map();
    this.lag = [];
  }

  // Serve one request: a chat completion or a control call.
  handle(req, res) {
    const arrived = nowUs();
    res.sendDate = false; // as bench/upstream.py: no Date header
    const parts = [];
    req.on("data", (d) => parts.push(d));
    req.on("end", () => {
      const body = Buffer.concat(parts);
      this.route(req.method, req.url.split("?", 1)[0], body, arrived, res).catch((err) => {
        if (!(err instanceof Gone)) log("request failed:", (err && err.stack) || err);
        res.destroy();
      });
    });
  }

  async route(method, path, body, arrived, res) {
    if (method === "POST" && path.endsWith("/chat/completions")) {
      await this.complete(JSON.parse(body.toString()), arrived, res);
    } else if (method === "POST" && path === "/control/go") {
      if (!this.goSet) {
        this.goUs = nowUs();
        this.goSet = true;
        this.fireGo();
      }
      reply(res, 200, { go_us: this.goUs });
    } else if (method === "POST" && path === "/control/release") {
      this.released = true;
      this.fireRelease();
      reply(res, 200, { released_us: nowUs() });
    } else if (path === "/control/count") {
      reply(res, 200, this.count());
    } else if (path === "/control/stats") {
      reply(res, 200, this.stats());
    } else if (path === "/control/clock") {
      reply(res, 200, { clock_us: nowUs(), pid: process.pid });
    } else {
      reply(res, 404, { error: { message: `no route ${method} ${path}` } });
    }
  }

  // Stream one chat completion following the plan in the user message.
  async complete(body, arrived, res) {
    const plan = parsePlan(body.messages || []);
    if (plan === null) {
      reply(res, 400, { error: { message: "no bench plan in the user message" } });
      return;
    }
    const rec = new Record(plan, arrived);
    this.records.set(plan.s, rec);
    const em = new Emitter(res, rec, this.width, this.lag);
    res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-cache" });
    await em.write(roleEvent()); // sent with the head, in one write
    let base = rec.arrivedUs;
    if (plan.gate) {
      await this.go;
      base = this.goUs;
    }
    if (plan.rate > 0) await em.paced(base);
    else await em.unpaced();
    if (plan.hold) await this.hold(em);
    if (em.closed) throw new Gone();
    em.ended = true;
    res.end(closingEvents(rec.produced)); // the last chunk and the terminating one, together
    rec.doneUs = nowUs();
  }

  // Keep the response open, with keepalive comments, until released.
  async hold(em) {
    while (!this.released) {
      let timer;
      const tick = new Promise((resolve) => {
        timer = setTimeout(resolve, KEEPALIVE_MS);
      });
      await Promise.race([this.release, tick]);
      clearTimeout(timer);
      if (!this.released) await em.write(": keepalive\n\n");
    }
  }

  // How many streams arrived, were fully written and finished.
  count() {
    const recs = [...this.records.values()];
    return {
      arrived: recs.length,
      written: recs.filter((r) => r.produced === r.plan.n).length,
      done: recs.filter((r) => r.doneUs).length,
      produced: recs.reduce((a, r) => a + r.produced, 0),
    };
  }

  // The counts, the pacing lag and every stream's record.
  stats() {
    const streams = {};
    for (const [s, r] of this.records) streams[String(s)] = r.asJson();
    return {
      go_us: this.goUs,
      ...this.count(),
      pacing_lag_ms: this.lag.length ? summarize(this.lag.map((x) => x / 1000)) : null,
      streams,
    };
  }
}

const REASONS = { 200: "OK", 400: "Bad Request", 404: "Not Found" };

function reply(res, status, payload) {
  const body = JSON.stringify(payload);
  res.writeHead(status, REASONS[status], {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(body),
  });
  res.end(body);
}

function main() {
  const args = process.argv.slice(2);
  const at = args.indexOf("--chunk-chars");
  const width = at >= 0 ? Number(args[at + 1]) : Number(process.env.CHUNK_CHARS || 20);
  const up = new Upstream(width);
  const server = http.createServer(
    {
      // As bench/upstream.py: connections stay open between requests for as long as relay's
      // client keeps them (Node would close an idle one after 5 s), and no request timeout.
      keepAliveTimeout: 0,
      requestTimeout: 0,
      headersTimeout: 0,
      noDelay: true,
      highWaterMark: HIGH_WATER,
    },
    (req, res) => up.handle(req, res),
  );
  server.keepAliveTimeout = 0;
  server.on("connection", (sock) => sock.setNoDelay(true)); // Nagle off, as asyncio sets it
  server.on("clientError", (err, sock) => sock.destroy());
  process.on("unhandledRejection", (err) => log("unhandled rejection:", (err && err.stack) || err));
  process.on("SIGTERM", () => process.exit(0)); // an orderly exit (which also writes --cpu-prof)
  server.listen({ host: "127.0.0.1", port: 0, backlog: 4096 }, () => {
    process.stdout.write(`PORT ${server.address().port}\n`);
  });
}

main();
