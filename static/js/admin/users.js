// The users table (search, sort, pages, utilisation bars, risk badges) and the two
// dialogs that change a user: edit limits (per-user overrides) and reset usage.

import { get, request } from "./api.js";
import { byId, debounce, el, formatInt, formatLimit, formatPercent, setText, throttle } from "./dom.js";
import { canWrite, reportError, toast } from "./ui.js";

const RISK_TITLE = {
  elevated: "at or above 80% of a daily limit",
  high: "at or above 90% of a daily limit",
  critical: "at or above 95% of a daily limit",
};
const PER_PAGE = 25;

function meter(percent) {
  // <meter> colours itself from low/high/optimum: no inline style needed under the CSP.
  return el("meter", {
    attrs: {
      min: 0,
      max: 100,
      low: 80,
      high: 90,
      optimum: 0,
      value: Math.min(100, percent ?? 0),
      "aria-label": percent === null ? "unlimited" : `${percent}% used`,
    },
  });
}

export class UsersTable {
  constructor({ onEdit, onReset }) {
    this.q = "";
    this.sort = "utilization";
    this.page = 1;
    this.pages = 1;
    this.commandTypes = [];
    this.onEdit = onEdit;
    this.onReset = onReset;
    this.loading = null;
    const search = byId("users-search");
    const searchLater = debounce(() => {
      this.q = search.value.trim();
      this.page = 1;
      this.refresh();
    }, 250);
    search.addEventListener("input", searchLater);
    byId("users-sort").addEventListener("change", (event) => {
      this.sort = event.target.value;
      this.page = 1;
      this.refresh();
    });
    byId("users-prev").addEventListener("click", () => this.go(this.page - 1));
    byId("users-next").addEventListener("click", () => this.go(this.page + 1));
    this.refreshSoon = throttle(() => this.refresh(), 1000);
  }

  go(page) {
    if (page < 1 || page > this.pages) return;
    this.page = page;
    this.refresh();
  }

  async refresh() {
    const query = { q: this.q, sort: this.sort, page: this.page, per_page: PER_PAGE };
    try {
      const response = await get("/users", query);
      // A slower, older answer must not overwrite a newer one.
      if (query.q !== this.q || query.sort !== this.sort || query.page !== this.page) return;
      if (response.page > response.pages && response.pages >= 1 && this.page !== response.pages) {
        this.page = response.pages;
        return this.refresh();
      }
      this.render(response);
    } catch (err) {
      reportError(err, "Loading users");
    }
  }

  render(response) {
    this.commandTypes = response.command_types;
    this.pages = response.pages;
    const head = byId("users-head");
    head.replaceChildren(
      el("th", { text: "User" }),
      ...this.commandTypes.map((c) => el("th", { text: c, attrs: { scope: "col" } })),
      el("th", { text: "Risk" }),
      el("th", { text: "Violations today", class: "num" }),
      canWrite ? el("th", { text: "Actions" }) : null,
    );
    const rows = response.items.map((u) => this._row(u));
    if (!rows.length) {
      const span = this.commandTypes.length + (canWrite ? 4 : 3);
      rows.push(el("tr", {}, [el("td", { class: "empty-row", text: "No users match.", attrs: { colspan: span } })]));
    }
    byId("users-body").replaceChildren(...rows);
    setText("users-page", `page ${response.page} of ${response.pages}`);
    byId("users-prev").disabled = response.page <= 1;
    byId("users-next").disabled = response.page >= response.pages;
    setText("users-summary", `${formatInt(response.total)} users`);
  }

  _row(u) {
    const row = el("tr", { attrs: { "data-username": u.username } });
    row.append(el("td", { class: "user-cell", attrs: { "data-label": "User" } }, [
      el("span", { class: "username", text: u.username }),
    ]));
    for (const c of this.commandTypes) {
      const usage = u.usage[c] || { used: 0, limit: null, percent: null, overridden: false };
      const label = `${formatInt(usage.used)} / ${formatLimit(usage.limit)}`;
      const cell = el("td", { class: "usage-cell", attrs: { "data-label": c, "data-type": c } }, [
        el("span", { class: "usage-text", text: label }),
        usage.overridden ? el("span", { class: "override-mark", text: "override", attrs: { title: "per-user limit" } }) : null,
        meter(usage.percent),
      ]);
      row.append(cell);
    }
    const riskCell = el("td", { attrs: { "data-label": "Risk" } });
    if (u.max_percent !== null) {
      riskCell.append(el("span", { class: "pct", text: formatPercent(u.max_percent) }));
    }
    if (u.risk) {
      riskCell.append(
        el("span", { class: `badge risk risk-${u.risk}`, text: u.risk, attrs: { title: RISK_TITLE[u.risk] } }),
      );
    }
    row.append(riskCell);
    row.append(el("td", { class: "num", text: formatInt(u.violations_today), attrs: { "data-label": "Violations today" } }));
    if (canWrite) {
      const edit = el("button", { class: "btn btn-small", text: "Edit limits", attrs: { type: "button" } });
      const reset = el("button", { class: "btn btn-small btn-ghost", text: "Reset usage", attrs: { type: "button" } });
      edit.addEventListener("click", () => this.onEdit(u.username));
      reset.addEventListener("click", () => this.onReset(u.username));
      row.append(el("td", { class: "actions", attrs: { "data-label": "Actions" } }, [edit, reset]));
    }
    return row;
  }
}

/** Parse one limit field: "" inherits, "unlimited" (or ∞) is null, else a whole number. */
export function parseLimit(text) {
  const value = text.trim();
  if (value === "") return { inherit: true };
  if (/^(unlimited|∞|none)$/i.test(value)) return { limit: null };
  if (/^\d{1,13}$/.test(value)) return { limit: Number(value) };
  return { error: true };
}

export class LimitsDialog {
  constructor() {
    this.dialog = byId("limits-dialog");
    this.username = null;
    this.detail = null;
    byId("limits-cancel").addEventListener("click", () => this.dialog.close());
    byId("limits-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.save();
    });
  }

  async open(username) {
    try {
      this.detail = await get(`/users/${encodeURIComponent(username)}`);
    } catch (err) {
      reportError(err, "Loading the user's limits");
      return;
    }
    this.username = username;
    setText("limits-user", username);
    setText("limits-error", "");
    const periods = this.detail.periods;
    byId("limits-head").replaceChildren(
      el("th", { text: "Command type" }),
      ...periods.map((p) => el("th", { text: p })),
    );
    const rows = Object.entries(this.detail.limits).map(([command, byPeriod]) => {
      const cells = periods.map((period) => {
        const info = byPeriod[period];
        const original = info.overridden ? (info.limit === null ? "unlimited" : String(info.limit)) : "";
        const input = el("input", {
          class: "limit-input",
          attrs: {
            type: "text",
            inputmode: "numeric",
            autocomplete: "off",
            "aria-label": `${command} ${period} limit`,
            placeholder: formatLimit(info.default), // greyed: the inherited default
            "data-command": command,
            "data-period": period,
            "data-original": original,
            name: `${command}.${period}`,
          },
        });
        input.value = original;
        const used = el("span", { class: "muted small", text: `used ${formatInt(info.used)}` });
        return el("td", { attrs: { "data-label": period } }, [input, used]);
      });
      return el("tr", {}, [el("th", { text: command, attrs: { scope: "row" } }), ...cells]);
    });
    byId("limits-body").replaceChildren(...rows);
    this.dialog.showModal();
  }

  async save() {
    const changes = new Map(); // command -> {set: {}, remove: []}
    for (const input of this.dialog.querySelectorAll("input.limit-input")) {
      const { command, period, original } = input.dataset;
      if (input.value.trim() === original) continue;
      const parsed = parseLimit(input.value);
      if (parsed.error) {
        setText("limits-error", `${command} ${period}: enter a whole number, "unlimited" or nothing`);
        input.focus();
        return;
      }
      const change = changes.get(command) || { set: {}, remove: [] };
      if (parsed.inherit) change.remove.push(period);
      else change.set[period] = parsed.limit;
      changes.set(command, change);
    }
    if (!changes.size) {
      this.dialog.close();
      return;
    }
    const name = encodeURIComponent(this.username);
    byId("limits-save").disabled = true;
    try {
      for (const [command, change] of changes) {
        const path = `/users/${name}/limits/${encodeURIComponent(command)}`;
        if (Object.keys(change.set).length) await request("PUT", path, { body: { limits: change.set } });
        if (change.remove.length) await request("DELETE", path, { query: { period: change.remove } });
      }
      this.dialog.close();
      toast(`Limits of ${this.username} updated`, "success", 3000);
    } catch (err) {
      setText("limits-error", err.message);
    } finally {
      byId("limits-save").disabled = false;
    }
  }
}

export class ResetDialog {
  constructor() {
    this.dialog = byId("reset-dialog");
    this.username = null;
    byId("reset-cancel").addEventListener("click", () => this.dialog.close());
    byId("reset-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.confirm();
    });
  }

  open(username, commandTypes) {
    this.username = username;
    setText("reset-user", username);
    setText("reset-error", "");
    const select = byId("reset-type");
    select.replaceChildren(
      el("option", { text: "all command types", attrs: { value: "" } }),
      ...commandTypes.map((c) => el("option", { text: c, attrs: { value: c } })),
    );
    this.dialog.showModal();
  }

  async confirm() {
    const commandType = byId("reset-type").value || null;
    byId("reset-confirm").disabled = true;
    try {
      const result = await request("POST", `/users/${encodeURIComponent(this.username)}/reset`, {
        body: { command_type: commandType },
      });
      this.dialog.close();
      toast(`Usage of ${this.username} reset (${result.counters_reset} counters)`, "success", 3000);
    } catch (err) {
      setText("reset-error", err.message);
    } finally {
      byId("reset-confirm").disabled = false;
    }
  }
}
