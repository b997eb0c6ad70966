// The four charts and their data: history over REST when the page loads (or reloads: the
// Reload button, `recovered: false`), then live points from the stream. Live increments
// only count events newer than the REST snapshot, so nothing is counted twice; nothing is
// polled.

import { get } from "./api.js";
import { byId } from "./dom.js";
import { TimeChart } from "./charts.js";
import { reportError } from "./ui.js";

const BLUE = "#60a5fa";
const RED = "#f87171";
const AMBER = "#fbbf24";
const VIOLET = "#a78bfa";
const ORANGE = "#fb923c";
const LOAD_SECONDS = 15 * 60;
// The ranges of the two activity charts: minutes shown, bucket seconds, caption.
export const RANGES = {
  "15m": { minutes: 15, bucket: 60, text: "per minute, last 15 min" },
  "1h": { minutes: 60, bucket: 60, text: "per minute, last hour" },
  "24h": { minutes: 1440, bucket: 600, text: "per 10 min, last 24 hours" },
  "30d": { minutes: 43200, bucket: 86400, text: "per UTC day, last 30 days" },
};

function epoch(iso) {
  return Date.parse(iso) / 1000;
}

export class LiveCharts {
  constructor() {
    this.offset = 0; // seconds: server clock minus this browser's clock
    this.activity = new Map(); // minute -> {t, commands, violations}
    this.activityAt = Infinity; // server time of the activity snapshot
    this.load = [];
    this.daily = [];
    this.dailyAt = Infinity;
    this.commandsToday = null;
    this.refusedToday = null;
    const now = () => Date.now() / 1000 + this.offset;
    this.range = RANGES["1h"];
    const lastHour = () => {
      const size = this.range.bucket;
      const current = Math.floor(now() / size) * size;
      return [current - (this.range.minutes * 60 / size - 1) * size, current + size];
    };
    this.commands = new TimeChart(byId("chart-commands"), {
      // A dip in admitted commands reads as "traffic stopped" unless what was turned away
      // stands next to it: denied (over quota) and refused for load.
      series: [
        { key: "commands", color: BLUE, label: "admitted commands" },
        { key: "violations", color: RED, label: "denied (violations)" },
        { key: "refused", color: ORANGE, label: "refused for load" },
      ],
      domain: lastHour,
      bucket: 60,
      now,
    });
    this.violations = new TimeChart(byId("chart-violations"), {
      series: [{ key: "violations", color: RED, label: "violations" }],
      domain: lastHour,
      bucket: 60,
      now,
    });
    byId("chart-range").addEventListener("change", (event) => this.setRange(event.target.value));
    this.loadChart = new TimeChart(byId("chart-load"), {
      series: [
        { key: "cpu_percent", color: AMBER, label: "CPU" },
        { key: "memory_percent", color: VIOLET, label: "memory" },
      ],
      domain: () => [now() - LOAD_SECONDS, now()],
      yMax: 100,
      unit: "%",
      gap: 30,
    });
    this.dailyChart = new TimeChart(byId("chart-daily"), {
      series: [{ key: "violations", color: RED, label: "violations" }],
      domain: () => {
        if (!this.daily.length) return [now() - 30 * 86400, now()];
        return [this.daily[0].t, this.daily[this.daily.length - 1].t + 86400];
      },
      bucket: 86400,
      labels: "day",
      now,
    });
    // The time axis slides even when nothing happens.
    setInterval(() => this.drawAll(), 5000);
  }

  /** Show the activity charts over another range (loaded from the history API). */
  setRange(name) {
    if (!RANGES[name]) return;
    this.range = RANGES[name];
    this.commands.o.bucket = this.violations.o.bucket = this.range.bucket;
    for (const node of document.querySelectorAll(".range-text")) node.textContent = this.range.text;
    byId("chart-range").value = name;
    this.loadHistory();
  }

  async loadHistory() {
    const range = this.range;
    try {
      const h = await get("/history", { minutes: range.minutes, bucket: range.bucket, load_minutes: 15 });
      if (range !== this.range) return; // another range was chosen meanwhile
      const serverNow = epoch(h.server_time);
      this.offset = serverNow - Date.now() / 1000;
      this.activity = new Map(h.activity.map((p) => [p.t, { ...p }]));
      this.activityAt = serverNow;
      this.load = h.load;
      this.drawActivity();
      this.loadChart.setPoints(this.load);
    } catch (err) {
      reportError(err, "Loading chart history");
    }
  }

  async loadDaily() {
    try {
      const d = await get("/violations/daily", { days: 30 });
      this.daily = d.days.map((p) => ({ t: p.start, violations: p.violations, date: p.date }));
      this.dailyAt = Date.now() / 1000 + this.offset;
      this.dailyChart.setPoints(this.daily);
    } catch (err) {
      reportError(err, "Loading violations per day");
    }
  }

  _bucket(t) {
    const size = this.range.bucket;
    const start = Math.floor(t / size) * size;
    let point = this.activity.get(start);
    if (!point) {
      point = { t: start, commands: 0, violations: 0, refused: 0 };
      this.activity.set(start, point);
      const oldest = start - (this.range.minutes * 60 + 5 * size);
      for (const key of this.activity.keys()) if (key < oldest) this.activity.delete(key);
    }
    return point;
  }

  /** A violation event (live or replayed). */
  violation(msg) {
    const t = epoch(msg.timestamp);
    if (t > this.activityAt) {
      this._bucket(t).violations += 1;
      this.drawActivity();
    }
    if (t > this.dailyAt && this.daily.length) {
      const today = this.daily[this.daily.length - 1];
      if (t >= today.t && t < today.t + 86400) {
        today.violations += 1;
        this.dailyChart.setPoints(this.daily);
      } else if (t >= today.t + 86400 && !this.dayTurning) {
        // A new day (in the server's time zone): its bucket comes from the server, once.
        this.dayTurning = true;
        this.loadDaily().finally(() => (this.dayTurning = false));
      }
    }
  }

  /** A stats message: commands from the change of commands_today, load from system_load. */
  stats(msg) {
    const data = msg.data;
    const t = epoch(msg.timestamp);
    if (typeof data.commands_today === "number") {
      const before = this.commandsToday;
      this.commandsToday = data.commands_today;
      // Only deltas count: a full snapshot after a reconnect covers an unknown span.
      if (data.delta && before !== null && data.commands_today > before && t > this.activityAt) {
        this._bucket(t).commands += data.commands_today - before;
        this.drawActivity();
      }
    }
    if (typeof data.load_refusals_today === "number") {
      const before = this.refusedToday;
      this.refusedToday = data.load_refusals_today;
      if (data.delta && before !== null && data.load_refusals_today > before && t > this.activityAt) {
        this._bucket(t).refused += data.load_refusals_today - before;
        this.drawActivity();
      }
    }
    const load = data.system_load;
    if (load && (load.cpu_percent > 0 || load.memory_percent > 0)) {
      const last = this.load[this.load.length - 1];
      if (!last || t > last.t) {
        this.load.push({ t, cpu_percent: load.cpu_percent, memory_percent: load.memory_percent });
        const oldest = t - LOAD_SECONDS - 60;
        while (this.load.length && this.load[0].t < oldest) this.load.shift();
        this.loadChart.setPoints(this.load);
      }
    }
  }

  /** Consumes refused for load in the commands chart's hour (for tests and debugging). */
  refusedInView() {
    const [t0, t1] = this.commands.o.domain();
    let sum = 0;
    for (const p of this.activity.values()) if (p.t >= t0 && p.t < t1) sum += p.refused || 0;
    return sum;
  }

  drawActivity() {
    const points = [...this.activity.values()];
    this.commands.setPoints(points);
    this.violations.setPoints(points);
  }

  drawAll() {
    this.commands.draw();
    this.violations.draw();
    this.loadChart.draw();
    this.dailyChart.draw();
  }
}
