// Time-series charts drawn on <canvas>: no third-party code, no network, sharp on HiDPI
// screens, redrawn when their box changes size. Points are {t: epoch seconds, <key>: n}.
// Pointing at a chart shows the values of the bucket (or the nearest sample) under it.

// Axis, grid and label colours for the dark and the light theme (prefers-color-scheme).
const LIGHT = typeof matchMedia === "function" && matchMedia("(prefers-color-scheme: light)").matches;
const AXIS = "#64748b";
const GRID = LIGHT ? "rgba(71, 85, 105, 0.18)" : "rgba(148, 163, 184, 0.15)";
const TEXT = LIGHT ? "#475569" : "#94a3b8";
const FONT = "11px system-ui, sans-serif";
const PAD = { top: 8, right: 10, bottom: 20, left: 38 };

/** About `count` round tick values from 0 to at least `max` (steps of 1, 2 or 5 x 10^n). */
export function niceTicks(max, count = 4) {
  const top = max > 0 ? max : 1;
  const raw = top / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let v = 0; v <= top + step * 0.999; v += step) ticks.push(Math.round(v * 1e6) / 1e6);
  if (ticks[ticks.length - 1] < top) ticks.push(ticks[ticks.length - 1] + step);
  return ticks;
}

function clock(t) {
  const d = new Date(t * 1000);
  return `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
}

function day(t) {
  // Day buckets start at midnight in the quota time zone; noon is inside the same date
  // for any offset within +/- 12 h.
  const d = new Date((t + 43200) * 1000);
  return d.toLocaleDateString([], { month: "short", day: "numeric", timeZone: "UTC" });
}

export class TimeChart {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {object} o
   * @param {{key: string, color: string, label?: string, fill?: string}[]} o.series
   * @param {() => [number, number]} o.domain  visible time range, epoch seconds
   * @param {number} [o.bucket]  bar width in seconds: draw bars instead of lines
   * @param {number} [o.yMax]    fixed top of the y axis (e.g. 100 for percentages)
   * @param {string} [o.unit]    suffix of y labels ("%")
   * @param {"clock"|"day"} [o.labels]
   * @param {number} [o.gap]     seconds between points that break a line
   * @param {() => number} [o.now] the current time: a bucket that has not ended yet is drawn
   *   faded (it is still being counted, so a low bar is not a drop)
   */
  constructor(canvas, o) {
    this.canvas = canvas;
    this.o = { labels: "clock", unit: "", gap: Infinity, ...o };
    this.points = [];
    this.drawn = false;
    this.layout = null; // {t0, t1, plot} of the last drawing, for pointing
    if (typeof ResizeObserver !== "undefined") {
      new ResizeObserver(() => this.draw()).observe(canvas);
    }
    this.tip = document.createElement("div");
    this.tip.className = "chart-tip";
    this.tip.hidden = true;
    canvas.parentElement.append(this.tip);
    canvas.addEventListener("pointermove", (event) => this._point(event));
    canvas.addEventListener("pointerleave", () => (this.tip.hidden = true));
  }

  /** The point under client x (a bucket containing it, else the nearest sample). */
  pointAt(clientX) {
    if (!this.layout) return null;
    const { t0, t1, plot } = this.layout;
    const x = clientX - this.canvas.getBoundingClientRect().left;
    if (x < plot.x || x > plot.x + plot.w) return null;
    const t = t0 + ((x - plot.x) / plot.w) * (t1 - t0);
    if (this.o.bucket) return this.points.find((p) => p.t <= t && t < p.t + this.o.bucket) || null;
    let best = null;
    for (const p of this.points) if (!best || Math.abs(p.t - t) < Math.abs(best.t - t)) best = p;
    return best;
  }

  /** The client x of time `t` (the middle of its bucket), for tests and the tooltip. */
  clientXOf(t) {
    const { t0, t1, plot } = this.layout;
    const mid = this.o.bucket ? t + this.o.bucket / 2 : t;
    return this.canvas.getBoundingClientRect().left + plot.x + ((mid - t0) / (t1 - t0)) * plot.w;
  }

  _point(event) {
    const p = this.pointAt(event.clientX);
    if (!p) {
      this.tip.hidden = true;
      return;
    }
    const when = this.o.labels === "day" ? day(p.t) : clock(p.t);
    const span = this.o.bucket && this.o.bucket < 86400 ? `${when}–${clock(p.t + this.o.bucket)}` : when;
    const lines = this.o.series.map((s) => {
      const v = p[s.key];
      const text = typeof v === "number" ? `${Math.round(v * 10) / 10}${this.o.unit}` : "–";
      return `${s.label || s.key}: ${text}`;
    });
    const partial = this.o.now && this.o.bucket && p.t + this.o.bucket > this.o.now() ? " (so far)" : "";
    this.tip.textContent = [`${span}${partial}`, ...lines].join("\n");
    this.tip.hidden = false;
    // Beside the pointer, inside the figure (CSSOM, which the CSP allows).
    const box = this.canvas.parentElement.getBoundingClientRect();
    const left = Math.min(event.clientX - box.left + 12, box.width - this.tip.offsetWidth - 4);
    this.tip.style.left = `${Math.max(4, left)}px`;
    this.tip.style.top = `${event.clientY - box.top + 12}px`;
  }

  setPoints(points) {
    this.points = points.slice().sort((a, b) => a.t - b.t);
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return; // hidden: drawn when it gets a size
    const ratio = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = FONT;

    const [t0, t1] = this.o.domain();
    const visible = this.points.filter((p) => p.t >= t0 - (this.o.bucket || 0) && p.t <= t1);
    const keys = this.o.series.map((s) => s.key);
    let max = 0;
    for (const p of visible) for (const k of keys) if (typeof p[k] === "number") max = Math.max(max, p[k]);
    const ticks = this.o.yMax ? niceTicks(this.o.yMax, 4) : niceTicks(max, 4);
    const top = this.o.yMax || ticks[ticks.length - 1];
    const plot = {
      x: PAD.left,
      y: PAD.top,
      w: Math.max(10, width - PAD.left - PAD.right),
      h: Math.max(10, height - PAD.top - PAD.bottom),
    };
    const xOf = (t) => plot.x + ((t - t0) / (t1 - t0)) * plot.w;
    this.layout = { t0, t1, plot };
    const yOf = (v) => plot.y + plot.h - (v / top) * plot.h;

    // Grid and y labels.
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const tick of ticks) {
      if (tick > top) continue;
      const y = Math.round(yOf(tick)) + 0.5;
      ctx.strokeStyle = GRID;
      ctx.beginPath();
      ctx.moveTo(plot.x, y);
      ctx.lineTo(plot.x + plot.w, y);
      ctx.stroke();
      ctx.fillStyle = TEXT;
      ctx.fillText(`${tick}${this.o.unit}`, plot.x - 5, y);
    }
    // X labels: about one per 90 px; under bars, at the start of a bucket.
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const labels = Math.max(2, Math.floor(plot.w / 90));
    const times = [];
    if (this.o.bucket) {
      const buckets = Math.round((t1 - t0) / this.o.bucket);
      const every = Math.max(1, Math.ceil(buckets / labels));
      for (let i = buckets - 1; i >= 0; i -= every) times.unshift(t0 + i * this.o.bucket);
    } else {
      for (let i = 0; i <= labels; i += 1) times.push(t0 + ((t1 - t0) * i) / labels);
    }
    for (const t of times) {
      const text = this.o.labels === "day" ? day(t) : clock(t);
      const center = this.o.bucket ? xOf(t + this.o.bucket / 2) : xOf(t);
      const x = Math.min(Math.max(center, plot.x + 16), plot.x + plot.w - 16);
      ctx.fillStyle = TEXT;
      ctx.fillText(text, x, plot.y + plot.h + 5);
    }
    ctx.strokeStyle = AXIS;
    ctx.beginPath();
    ctx.moveTo(plot.x, plot.y + plot.h + 0.5);
    ctx.lineTo(plot.x + plot.w, plot.y + plot.h + 0.5);
    ctx.stroke();

    if (!visible.length) {
      ctx.fillStyle = TEXT;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText("no data yet", plot.x + plot.w / 2, plot.y + plot.h / 2);
      this.drawn = true;
      return;
    }
    ctx.save();
    ctx.beginPath();
    ctx.rect(plot.x, plot.y - 1, plot.w, plot.h + 2);
    ctx.clip();
    if (this.o.bucket) this._bars(ctx, visible, xOf, yOf);
    else this._lines(ctx, visible, xOf, yOf, plot);
    ctx.restore();
    this.drawn = true;
  }

  _bars(ctx, points, xOf, yOf) {
    const n = this.o.series.length;
    const now = this.o.now ? this.o.now() : Infinity;
    for (const p of points) {
      const partial = p.t + this.o.bucket > now;
      const left = xOf(p.t);
      const full = Math.max(1, xOf(p.t + this.o.bucket) - left);
      const gap = full > 4 ? Math.min(2, full * 0.2) : 0;
      const w = (full - gap) / n;
      this.o.series.forEach((s, i) => {
        const v = p[s.key];
        if (typeof v !== "number" || v <= 0) return;
        const y = yOf(v);
        ctx.fillStyle = s.color;
        ctx.globalAlpha = partial ? 0.4 : 1;
        ctx.fillRect(left + gap / 2 + i * w, y, Math.max(1, w), yOf(0) - y);
      });
      ctx.globalAlpha = 1;
    }
  }

  _lines(ctx, points, xOf, yOf, plot) {
    for (const s of this.o.series) {
      const segments = [];
      let segment = [];
      let previous = null;
      for (const p of points) {
        if (typeof p[s.key] !== "number") continue;
        if (previous && p.t - previous.t > this.o.gap) {
          segments.push(segment);
          segment = [];
        }
        segment.push([xOf(p.t), yOf(p[s.key])]);
        previous = p;
      }
      segments.push(segment);
      for (const seg of segments) {
        if (!seg.length) continue;
        if (s.fill && seg.length > 1) {
          ctx.fillStyle = s.fill;
          ctx.beginPath();
          ctx.moveTo(seg[0][0], plot.y + plot.h);
          for (const [x, y] of seg) ctx.lineTo(x, y);
          ctx.lineTo(seg[seg.length - 1][0], plot.y + plot.h);
          ctx.closePath();
          ctx.fill();
        }
        ctx.strokeStyle = s.color;
        ctx.lineWidth = 1.5;
        ctx.lineJoin = "round";
        ctx.beginPath();
        seg.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
        ctx.stroke();
        if (seg.length === 1) {
          ctx.fillStyle = s.color;
          ctx.fillRect(seg[0][0] - 1.5, seg[0][1] - 1.5, 3, 3);
        }
      }
    }
  }
}
