// What third-party plugins add, shown without the page knowing them in advance: their
// stats fields as figure cards, and their declared event types as a live feed. Plugin
// data reaches the page only as text (see dom.js).

import { byId, el, formatInt, formatTime, setText } from "./dom.js";

// Plugin event types the page renders elsewhere (the Users tab applies `usage`).
const SHOWN_ELSEWHERE = new Set(["usage"]);
const MAX_EVENTS = 50;
const MAX_ENTRIES = 6; // lines on one figure card
const MAX_TEXT = 160; // characters of one event's summary

const decimal = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });

/** One value as short text; the field name decides units (`*_bytes`, `*percent`). */
export function formatValue(name, value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "number") {
    if (!Number.isFinite(value)) return "—";
    if (/bytes$/.test(name)) return formatBytes(value);
    if (/percent$/.test(name)) return `${decimal.format(value)}%`;
    return Number.isInteger(value) ? formatInt(value) : decimal.format(value);
  }
  if (typeof value === "string") return value;
  return truncate(JSON.stringify(value));
}

function formatBytes(value) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let n = value;
  let unit = 0;
  while (Math.abs(n) >= 1024 && unit < units.length - 1) {
    n /= 1024;
    unit += 1;
  }
  return `${decimal.format(n)} ${units[unit]}`;
}

function truncate(text) {
  return text.length > MAX_TEXT ? `${text.slice(0, MAX_TEXT - 1)}…` : text;
}

/** An event's data in one line: its `message` if it has one, else `key value` pairs. */
function summarize(data) {
  if (data === null || typeof data !== "object") return formatValue("", data);
  if (typeof data.message === "string") return truncate(data.message);
  const parts = Object.entries(data).map(([k, v]) => `${k} ${formatValue(k, v)}`);
  return truncate(parts.join(" · "));
}

export class PluginPanel {
  /** `types`: the plugins' event types; `shown`: the stats fields the page renders itself
   * (the `data-field` of its own elements), so that every other field gets a card. */
  constructor(types, shown) {
    this.types = types.filter((t) => !SHOWN_ELSEWHERE.has(t));
    this.shown = shown;
    this.cards = byId("plugin-figures");
    this.section = byId("plugin-events");
    this.list = byId("plugin-events-feed");
    this.items = new Map(); // key (seq, or "live-N" for live-only events) -> envelope
    this.liveCount = 0;
    this.section.hidden = this.types.length === 0;
  }

  /** Whether the feed shows this event type. */
  shows(type) {
    return this.types.includes(type);
  }

  /** The REST query for the feed's first page, or null when no plugin declares a type. */
  query() {
    return this.types.length ? { types: this.types.join(","), limit: MAX_EVENTS } : null;
  }

  /** Replace the feed with a REST page (newest first), keeping newer stream items. */
  load(response) {
    const keep = [...this.items.entries()].filter(
      ([, m]) => m.seq === undefined || m.seq === null || m.seq > response.seq,
    );
    this.items = new Map([...response.items.map((m) => [m.seq, m]), ...keep]);
    this._render();
  }

  /** Add one streamed event (durable ones are shown once, by seq). */
  add(msg) {
    const durable = typeof msg.seq === "number";
    const key = durable ? msg.seq : `live-${(this.liveCount += 1)}`;
    if (this.items.has(key)) return false;
    this.items.set(key, msg);
    this._render();
    return true;
  }

  reset() {
    this.items.clear();
    this._render();
  }

  /** Cards for the stats fields of plugins (those the overview does not show). */
  figures(stats) {
    const fields = Object.keys(stats)
      .filter((k) => !this.shown.has(k) && k !== "delta")
      .sort();
    this.cards.replaceChildren(...fields.map((name) => this._card(name, stats[name])));
    this.cards.hidden = fields.length === 0;
  }

  _card(name, value) {
    const card = el("article", { class: "card plugin-card", attrs: { "data-field": name } }, [
      el("h2", { text: name }),
    ]);
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      const entries = Object.entries(value).slice(0, MAX_ENTRIES);
      card.append(
        el(
          "dl",
          { class: "plugin-values" },
          entries.flatMap(([k, v]) => [
            el("dt", { text: k }),
            el("dd", { text: formatValue(k, v), attrs: { "data-key": k } }),
          ]),
        ),
      );
    } else {
      card.append(el("p", { class: "value", text: formatValue(name, value) }));
    }
    return card;
  }

  _render() {
    // Newest first: durable events by seq, live-only ones by arrival among them.
    const ordered = [...this.items.values()].sort(
      (a, b) => (b.timestamp || "").localeCompare(a.timestamp || "") || (b.seq || 0) - (a.seq || 0),
    );
    for (const msg of ordered.slice(MAX_EVENTS)) {
      for (const [key, m] of this.items) if (m === msg) this.items.delete(key);
    }
    this.list.replaceChildren(...ordered.slice(0, MAX_EVENTS).map((m) => this._node(m)));
    setText("plugin-events-count", Math.min(this.items.size, MAX_EVENTS));
    byId("plugin-events-empty").hidden = this.items.size > 0;
  }

  _node(msg) {
    const time = el("time", { class: "p-time", text: formatTime(msg.timestamp) });
    time.setAttribute("datetime", msg.timestamp || "");
    return el(
      "li",
      { class: "feed-item plugin-event", attrs: { "data-type": msg.type, "data-seq": msg.seq } },
      [
        el("div", { class: "item-head" }, [el("span", { class: "badge p-type", text: msg.type }), time]),
        el("div", { class: "p-text", text: summarize(msg.data) }),
      ],
    );
  }
}
