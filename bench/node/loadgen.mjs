// Load generator process (node bench/node/loadgen.mjs <outdir>): many WebSocket viewers.
//
// The counterpart of bench/loadgen.py and bench/loadgen_runs.py, with the same protocol: the
// orchestrator sends one JSON command per line on stdin and gets one JSON reply per line (same
// "id") on stdout; progress goes to stderr. Commands: attach (open viewers, which then read
// until the server closes), wait_closed, report_now, catchup, dispatch, clock and exit.
// Latencies go to .npy files next to the process's log, as the Python one writes them.
//
// Viewers are `ws` clients as a browser would be: permessage-deflate offered
// ("permessage-deflate; client_max_window_bits", what Chrome and Python's websockets offer),
// the bearer token in the Authorization header, no client pings, no size limit.

import http from "node:http";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";
import WebSocket from "ws";
import { log, nowUs, r3, Samples, saveNpyInt64, summarize } from "./common.mjs";
import { inflateOnMainThread } from "./inflate.mjs";
import { Tally } from "./viewer.mjs";

inflateOnMainThread();

// websockets (Python) ends a read loop quietly on these close codes and raises otherwise.
const OK_CLOSE_CODES = new Set([1000, 1001, 1005]);

// Open a viewer socket as a browser would. The caller gets the socket at once, to put its
// listeners on before any frame can arrive, and a promise that settles on the handshake.
function openWs(url, token, timeoutS = 60) {
  const ws = new WebSocket(url, {
    headers: { Authorization: `Bearer ${token}` },
    perMessageDeflate: true,
    handshakeTimeout: timeoutS * 1000,
    maxPayload: 0, // no limit (max_size=None)
    closeTimeout: 5000, // close_timeout=5
  });
  let failure = null;
  ws.on("error", (err) => {
    failure = failure || err;
  });
  const opened = new Promise((resolve, reject) => {
    const onOpen = () => {
      ws.off("close", onClose);
      resolve(ws);
    };
    const onClose = (code) => {
      ws.off("open", onOpen);
      reject(failure || new Error(`closed during the handshake (${code})`));
    };
    ws.once("open", onOpen);
    ws.once("close", onClose);
  });
  opened.catch(() => {}); // a caller that never awaits it must not crash the process
  return { ws, opened, failure: () => failure };
}

// What went wrong with a socket, as a short string.
const describe = (err) => String((err && (err.message || err.code)) || err).slice(0, 200);

// Read until the server closes, accounting for every message as it arrives (follow() in
// bench/loadgen.py). Resolves once the viewer is over.
function follow(ws, tally, lat, failure) {
  return new Promise((resolve) => {
    let stopped = false;
    let isOpen = false;
    ws.once("open", () => {
      isOpen = true;
    });
    ws.on("message", (data) => {
      if (stopped) return;
      try {
        tally.feed(data.toString(), nowUs(), lat);
      } catch (err) {
        // A bad message stops this viewer (its socket is no longer read), not the others.
        tally.error = describe(err);
        tally.closeCode = 1006;
        stopped = true;
        ws.pause();
        resolve();
      }
    });
    ws.on("close", (code, reason) => {
      if (stopped || !isOpen) return; // a failed handshake is attach()'s to report
      if (!OK_CLOSE_CODES.has(code)) {
        const why = failure() ? `; ${describe(failure())}` : "";
        tally.error = `closed abnormally: received ${code} ${reason.toString()}${why}`.slice(0, 200);
      }
      tally.closeCode = code;
      stopped = true;
      resolve();
    });
  });
}

// A counting semaphore (asyncio.Semaphore).
class Semaphore {
  constructor(n) {
    this.free = n;
    this.waiting = [];
  }

  async acquire() {
    if (this.free > 0) {
      this.free -= 1;
      return;
    }
    await new Promise((resolve) => this.waiting.push(resolve));
  }

  release() {
    const next = this.waiting.shift();
    if (next) next();
    else this.free += 1;
  }
}

const countInto = (counts, key) => {
  counts[key] = (counts[key] || 0) + 1;
};
const pyStr = (x) => (x === null || x === undefined ? "None" : String(x));

// Viewers attached by this process and the latencies they measured.
class LoadGen {
  constructor(outdir) {
    this.outdir = outdir;
    this.tallies = [];
    this.follows = [];
    this.lat = new Samples();
    this.attachMs = [];
  }

  // Open every listed viewer ([stream id, stream idx, lines]); return once all are open.
  async attach(url, token, viewers, conc) {
    const sem = new Semaphore(conc);
    const t0 = nowUs();
    const one = async ([sid, s, n]) => {
      const tally = new Tally(s, n);
      this.tallies.push(tally);
      await sem.acquire();
      try {
        const t = nowUs();
        const { ws, opened, failure } = openWs(`${url}/api/v1/streams/${sid}/ws?after=0&batch=1`, token);
        const done = follow(ws, tally, this.lat, failure);
        try {
          await opened;
        } catch (err) {
          tally.error = `connect: ${describe(err)}`.slice(0, 200);
          return; // never opened: not "closed" either, as in bench/loadgen.py
        }
        this.attachMs.push((nowUs() - t) / 1000);
        // ws applies what the server's Sec-WebSocket-Extensions reply accepted (or fails
        // the handshake on a reply it did not offer): this is what is in effect.
        tally.deflate = ws.extensions.split(",").some((e) => e.trim().startsWith("permessage-deflate"));
        this.follows.push(done);
      } finally {
        sem.release();
      }
    };
    await Promise.all(viewers.map(one));
    const errors = this.tallies.filter((t) => t.error).map((t) => t.error);
    return {
      attach_wall_ms: r3((nowUs() - t0) / 1000),
      opened: this.follows.length,
      errors: errors.length,
      error_samples: errors.slice(0, 3),
    };
  }

  // Wait for every viewer to be closed (at most timeoutS); return the report.
  async waitClosed(timeoutS) {
    if (this.follows.length) {
      let timer;
      const limit = new Promise((resolve) => {
        timer = setTimeout(resolve, timeoutS * 1000);
      });
      await Promise.race([Promise.all(this.follows), limit]);
      clearTimeout(timer);
    }
    return this.report();
  }

  // Sum the viewers' accounts; write the latency samples (µs) to .npy files.
  report() {
    mkdirSync(this.outdir, { recursive: true });
    const latPath = join(this.outdir, `lat-${process.pid}.npy`);
    const firstPath = join(this.outdir, `first-${process.pid}.npy`);
    saveNpyInt64(latPath, this.lat.buf, this.lat.length);
    const firsts = this.tallies.filter((t) => t.firstLatUs !== null).map((t) => t.firstLatUs);
    saveNpyInt64(firstPath, firsts);
    const sums = { unique: 0, dup: 0, ooo: 0, foreign: 0, seq_gaps: 0, seq_dups: 0, msgs: 0, complete: 0, closed: 0, deflate: 0 };
    const closeCodes = {};
    const terminals = {};
    const shas = {};
    const errors = [];
    let lastRecv = 0;
    for (const t of this.tallies) {
      sums.unique += t.unique;
      sums.dup += t.dup;
      sums.ooo += t.ooo;
      sums.foreign += t.foreign;
      sums.seq_gaps += t.seqGaps;
      sums.seq_dups += t.seqDups;
      sums.msgs += t.msgs;
      sums.complete += t.complete ? 1 : 0;
      sums.closed += t.closeCode !== null ? 1 : 0;
      sums.deflate += t.deflate ? 1 : 0;
      countInto(closeCodes, pyStr(t.closeCode));
      countInto(terminals, pyStr(t.terminal));
      countInto((shas[String(t.s)] ||= {}), t.shaHex());
      if (t.error) errors.push(t.error);
      lastRecv = Math.max(lastRecv, t.lastRecvUs);
    }
    return {
      viewers: this.tallies.length,
      opened: this.follows.length,
      ...sums,
      close_codes: closeCodes,
      terminals,
      errors: errors.slice(0, 5),
      n_errors: errors.length,
      last_recv_us: lastRecv,
      sha_by_stream: shas,
      attach_call_ms: summarize(this.attachMs),
      lat_file: latPath,
      first_file: firstPath,
    };
  }
}

// ----------------------------------------------------------------------------------------
// One-shot runs (bench/loadgen_runs.py): catch-up readers and sequential dispatches.
// ----------------------------------------------------------------------------------------

const fmtG = (x) => String(Number(x)); // Python's f"{x:g}" for the timeouts used here

// Run `reps` rounds of `k` viewers attaching at once from seq 0.
async function catchup({ url, token, k, reps, mode, expect_chars, expect_sha, timeout_s }) {
  const runs = [];
  for (let r = 0; r < reps; r++) {
    const t0 = nowUs();
    const jobs = [];
    for (let j = 0; j < k; j++) jobs.push(catchupOne(url, token, mode, expect_chars, expect_sha, timeout_s));
    const viewers = await Promise.all(jobs);
    runs.push({ wall_ms: r3((nowUs() - t0) / 1000), viewers });
  }
  return { runs };
}

// One catch-up read: connect, then read to the last chunk (live) or to done; the times,
// message count, exactness and close code (_CatchupViewer in bench/loadgen_runs.py).
function catchupOne(url, token, mode, chars, sha, timeoutS) {
  return new Promise((resolve) => {
    const tally = new Tally(0, 0, { parse: false });
    const lat = new Samples();
    const out = {};
    const t0 = nowUs();
    let isOpen = false;
    let reading = true; // false once the read is over (finished, failed or timed out)
    let closed = false;
    let gaveUp = false; // the server did not close within 5 s of done
    let settled = false;
    let waitClose = null;
    const { ws, failure } = openWs(url, token);
    const finished = () => (mode === "live" ? tally.chars >= chars : tally.terminal !== null);

    const settle = () => {
      if (settled) return;
      settled = true;
      clearTimeout(limit);
      clearTimeout(waitClose);
      const exact =
        tally.seqGaps === 0 &&
        tally.seqDups === 0 &&
        tally.chars === chars &&
        tally.shaHex() === sha &&
        (mode === "live" || tally.terminal === "done");
      resolve({ ...out, msgs: tally.msgs, chars: tally.chars, exact, close_code: tally.closeCode, error: tally.error });
    };
    // A finished stream is closed by the server (1000) after done: wait 5 s for it; a live
    // one (or a failed read) is closed by us, the handshake limited to 5 s (closeTimeout).
    const stop = () => {
      reading = false;
      if (closed) return settle();
      if (mode === "finished" && tally.error === null) {
        waitClose = setTimeout(() => {
          gaveUp = true;
          tally.closeCode = 1006; // still open: websockets' close_code is None, counted 1006
          ws.terminate();
          settle();
        }, 5000);
      } else {
        ws.close(1000);
      }
    };
    const limit = setTimeout(() => {
      if (!reading) return;
      tally.error = `incomplete after ${fmtG(timeoutS)} s: ${tally.chars} of ${chars} chars`;
      if (!isOpen) {
        reading = false;
        ws.terminate(); // never opened: no close code, as in bench/loadgen_runs.py
        return settle();
      }
      stop();
    }, timeoutS * 1000);

    ws.once("open", () => {
      isOpen = true;
      out.connect_ms = r3((nowUs() - t0) / 1000);
    });
    ws.on("message", (data) => {
      if (!reading) return;
      const t = nowUs();
      if (!("first_ms" in out)) out.first_ms = r3((t - t0) / 1000);
      try {
        tally.feed(data.toString(), t, lat);
      } catch (err) {
        tally.error = describe(err);
        return stop();
      }
      if (finished()) {
        out.ms = r3((t - t0) / 1000);
        stop();
      }
    });
    ws.on("close", (code, reason) => {
      closed = true;
      if (!isOpen) {
        if (tally.error === null) tally.error = describe(failure() || `closed during the handshake (${code})`);
      } else {
        if (reading && !OK_CLOSE_CODES.has(code)) {
          const why = failure() ? `; ${describe(failure())}` : "";
          tally.error = `closed abnormally: received ${code} ${reason.toString()}${why}`.slice(0, 200);
        }
        if (!gaveUp) tally.closeCode = code;
      }
      reading = false;
      settle();
    });
  });
}

// A JSON POST with the bearer token, on a keep-alive connection (httpx.AsyncClient).
function postJson(agent, base, path, token, payload) {
  const body = JSON.stringify(payload);
  return new Promise((resolve, reject) => {
    const req = http.request(
      new URL(path, base),
      {
        method: "POST",
        agent,
        headers: {
          Authorization: `Bearer ${token}`,
          "Content-Type": "application/json",
          "Content-Length": Buffer.byteLength(body),
        },
      },
      (res) => {
        const parts = [];
        res.on("data", (d) => parts.push(d));
        res.on("end", () => resolve({ status: res.statusCode, body: Buffer.concat(parts).toString() }));
        res.on("error", reject);
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

// POST each chat in turn, open its socket, read to the end; return the timestamps.
async function dispatch({ http_url, ws_url, token, items, timeout_s }) {
  const agent = new http.Agent({ keepAlive: true });
  const results = [];
  try {
    for (const item of items) {
      const abort = { ws: null };
      let timer;
      const limit = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error("TimeoutError()")), timeout_s * 1000);
      });
      try {
        const one = item.flow === STREAMED ? dispatchStreamed(agent, http_url, token, item, abort)
          : dispatchOne(agent, http_url, ws_url, token, item, abort);
        results.push(await Promise.race([one, limit]));
      } catch (err) {
        if (abort.ws) abort.ws.terminate();
        if (abort.req) abort.req.destroy();
        results.push({ s: item.s, error: describe(err) });
      } finally {
        clearTimeout(timer);
      }
    }
  } finally {
    agent.destroy();
  }
  return { results };
}

async function dispatchOne(agent, httpUrl, wsUrl, token, item, abort) {
  const tPost = nowUs();
  const resp = await postJson(agent, httpUrl, "/api/v1/chat", token, { message: item.message });
  const tPosted = nowUs();
  if (resp.status >= 400) throw new Error(`POST /api/v1/chat: HTTP ${resp.status}: ${resp.body.slice(0, 100)}`);
  const sid = JSON.parse(resp.body).streamId;
  const tWs = nowUs();
  const tally = new Tally(item.s, item.n);
  const lat = new Samples();
  let first = null;
  let closeCode = null;
  const { ws, opened } = openWs(`${wsUrl}/api/v1/streams/${sid}/ws?after=0&batch=1`, token);
  abort.ws = ws;
  let failed = null;
  const ended = new Promise((resolve) => {
    ws.on("message", (data) => {
      if (failed) return;
      const t = nowUs();
      try {
        tally.feed(data.toString(), t, lat);
      } catch (err) {
        failed = err; // bench/loadgen_runs.py lets this propagate: the chat is an error
        ws.terminate();
      }
      if (first === null && tally.chars) first = t;
    });
    ws.on("close", (code) => {
      closeCode = code;
      resolve();
    });
  });
  await opened;
  const tOpen = nowUs();
  await ended;
  if (failed) throw failed;
  return {
    s: item.s,
    stream_id: sid,
    post_start_us: tPost,
    post_end_us: tPosted,
    ws_start_us: tWs,
    ws_open_us: tOpen,
    first_chunk_us: first,
    close_code: closeCode,
    complete: tally.complete,
    terminal: tally.terminal,
  };
}

// POST asking for the answer on the response (Accept: text/event-stream): the turn event,
// then the events (batch form), read to the terminal one (bench/loadgen_runs.py).
const STREAMED = "streamed";

function dispatchStreamed(agent, httpUrl, token, item, abort) {
  const body = JSON.stringify({ message: item.message });
  const tPost = nowUs();
  const tally = new Tally(item.s, item.n);
  const lat = new Samples();
  let first = null;
  let tTurn = null;
  let sid = null;
  return new Promise((resolve, reject) => {
    const req = http.request(
      new URL("/api/v1/chat?batch=1", httpUrl),
      {
        method: "POST",
        agent,
        headers: {
          Authorization: `Bearer ${token}`,
          Accept: "text/event-stream",
          "Content-Type": "application/json",
          "Content-Length": Buffer.byteLength(body),
        },
      },
      (res) => {
        if (res.statusCode !== 200) {
          res.resume();
          reject(new Error(`POST /api/v1/chat (events): HTTP ${res.statusCode}`));
          return;
        }
        res.setEncoding("utf8");
        let buf = "";
        res.on("data", (text) => {
          const t = nowUs();
          buf += text;
          let end;
          while ((end = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, end);
            buf = buf.slice(end + 2);
            let kind = "";
            let data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) kind = line.slice(6).trim();
              else if (line.startsWith("data:")) data = line.slice(5).replace(/^ /, "");
            }
            if (!data) continue;
            try {
              if (kind === "turn") {
                sid = JSON.parse(data).streamId;
                tTurn = t;
              } else {
                tally.feed(data, t, lat);
                if (first === null && tally.chars) first = t;
              }
            } catch (err) {
              req.destroy();
              reject(err);
              return;
            }
          }
        });
        res.on("end", () =>
          resolve({
            s: item.s,
            stream_id: sid,
            post_start_us: tPost,
            turn_us: tTurn,
            first_chunk_us: first,
            close_code: null,
            complete: tally.complete,
            terminal: tally.terminal,
            flow: STREAMED,
          }),
        );
        res.on("error", reject);
      },
    );
    abort.req = req;
    req.on("error", reject);
    req.end(body);
  });
}

// ----------------------------------------------------------------------------------------
// The command loop.
// ----------------------------------------------------------------------------------------

async function execute(gen, cmd) {
  switch (cmd.cmd) {
    case "attach":
      return gen.attach(cmd.url, cmd.token, cmd.viewers, cmd.conc);
    case "wait_closed":
      return gen.waitClosed(cmd.timeout_s);
    case "report_now":
      return gen.report();
    case "catchup":
      return catchup(cmd.args);
    case "dispatch":
      return dispatch(cmd.args);
    case "clock":
      return { clock_us: nowUs(), pid: process.pid };
    case "exit":
      return { pid: process.pid };
    default:
      throw new Error(`unknown command ${cmd.cmd}`);
  }
}

function main() {
  const outdir = process.argv[2];
  if (!outdir) {
    process.stderr.write("usage: node loadgen.mjs <outdir>\n");
    process.exit(2);
  }
  process.on("unhandledRejection", (err) => log("unhandled rejection:", (err && err.stack) || err));
  process.on("SIGTERM", () => process.exit(0)); // an orderly exit (which also writes --cpu-prof)
  const gen = new LoadGen(outdir);
  const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
  rl.on("line", async (line) => {
    if (!line.trim()) return;
    const cmd = JSON.parse(line);
    let reply;
    try {
      reply = { id: cmd.id, ok: true, ...(await execute(gen, cmd)) };
    } catch (err) {
      reply = { id: cmd.id, ok: false, error: String((err && err.stack) || err).slice(0, 800) };
    }
    process.stdout.write(JSON.stringify(reply) + "\n"); // a pipe: written synchronously
    if (cmd.cmd === "exit") process.exit(0); // open sockets need no orderly close
  });
  rl.on("close", () => process.exit(0)); // the orchestrator is gone
}

main();
