// Helpers shared by the Node load generator and the Node upstream, each the counterpart of
// a function in bench/stats.py, so that both implementations report the same figures.

import { writeFileSync } from "node:fs";

// CLOCK_MONOTONIC in µs: libuv's uv_hrtime reads clock_gettime(CLOCK_MONOTONIC), the clock of
// Python's time.monotonic_ns() (bench.stats.now_us), shared by every process on the host.
export const nowUs = () => Number(process.hrtime.bigint() / 1000n);

export const sleepMs = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export const log = (...parts) =>
  process.stderr.write(`[${process.env.BENCH_ROLE || "node"} ${new Date().toISOString().slice(11, 23)}] ${parts.join(" ")}\n`);

// bench.stats.r3: three decimals, None (null) for a missing value or NaN. Python rounds half
// to even on the exact binary value; toFixed rounds the exact value too, ties upwards: the two
// differ only on exact ties (x.xxx5 representable in binary), in the last decimal.
export function r3(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return null;
  return Number(Number(x).toFixed(3));
}

// bench.stats._pct: the value at index ceil(p/100 * n) - 1 of the sorted sample.
function pct(sorted, p) {
  const n = sorted.length;
  return sorted[Math.min(n - 1, Math.max(0, Math.ceil((p / 100) * n) - 1))];
}

// bench.stats.summarize: n, p50/p90/p99/p999, max, min and mean.
export function summarize(values) {
  const a = Float64Array.from(values).sort();
  if (!a.length) return { n: 0 };
  let sum = 0;
  for (const x of a) sum += x;
  return {
    n: a.length,
    p50: r3(pct(a, 50)),
    p90: r3(pct(a, 90)),
    p99: r3(pct(a, 99)),
    p999: r3(pct(a, 99.9)),
    max: r3(a[a.length - 1]),
    min: r3(a[0]),
    mean: r3(sum / a.length),
  };
}

// Python's int() on a decimal string: surrounding whitespace, a sign, digits (underscores
// between digits allowed); NaN where int() would raise ValueError.
export function pyInt(s) {
  const n = s.length;
  if (n > 0 && n < 16) {
    let v = 0;
    let i = 0;
    for (; i < n; i++) {
      const c = s.charCodeAt(i) - 48;
      if (c < 0 || c > 9) break;
      v = v * 10 + c;
    }
    if (i === n) return v; // the common case: plain digits
  }
  const t = s.trim();
  if (!/^[+-]?\d+(?:_\d+)*$/.test(t)) return NaN;
  return Number(t.replace(/_/g, ""));
}

// Python's len() of a str: code points, where JavaScript counts UTF-16 units.
export function codePoints(text) {
  if (!/[\uD800-\uDBFF]/.test(text)) return text.length;
  let n = 0;
  for (const _ of text) n++;
  return n;
}

// A growable array of integers (latency samples in µs), written as int64.
export class Samples {
  constructor() {
    this.buf = new Float64Array(1024);
    this.length = 0;
  }

  push(x) {
    if (this.length === this.buf.length) {
      const bigger = new Float64Array(this.buf.length * 2);
      bigger.set(this.buf);
      this.buf = bigger;
    }
    this.buf[this.length++] = x;
  }
}

// np.save of a 1-D int64 array (.npy format 1.0, header padded to 64 bytes as numpy does).
export function saveNpyInt64(path, values, length = values.length) {
  let header = `{'descr': '<i8', 'fortran_order': False, 'shape': (${length},), }`;
  const total = 10 + header.length + 1;
  header += " ".repeat((64 - (total % 64)) % 64) + "\n";
  const head = Buffer.alloc(10 + header.length);
  head.write("\x93NUMPY", 0, "latin1");
  head[6] = 1;
  head[7] = 0;
  head.writeUInt16LE(header.length, 8);
  head.write(header, 10, "latin1");
  const data = new BigInt64Array(length);
  for (let i = 0; i < length; i++) data[i] = BigInt(values[i]);
  writeFileSync(path, Buffer.concat([head, Buffer.from(data.buffer)]));
}
