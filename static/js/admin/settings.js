// The Rules tab (global defaults, per-user overrides) and the Audit log tab.

import { get, request } from "./api.js";
import { byId, el, formatLimit, formatTime, setText, throttle } from "./dom.js";
import { canWrite, reportError, toast } from "./ui.js";
import { parseLimit } from "./users.js";

export class RulesPanel {
  constructor() {
    this.rules = null;
    this.refreshSoon = throttle(() => this.refresh(), 1000);
  }

  async refresh() {
    try {
      const [rules, overrides] = await Promise.all([get("/rules"), this._allOverrides()]);
      this.render(rules);
      this._overrides(overrides);
    } catch (err) {
      reportError(err, "Loading rules");
    }
    return this.rules;
  }

  // Every override, page by page (the list is keyset-paged: follow next_cursor).
  async _allOverrides() {
    const items = [];
    let cursor = null;
    do {
      const page = await get("/overrides", cursor ? { cursor } : {});
      items.push(...page.items);
      cursor = page.next_cursor;
    } while (cursor);
    // The API pages in index order (by user id); people look for a name.
    const key = (o) => [o.username, o.command_type, o.period].join("\u0000");
    return items.sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0));
  }

  render(rules) {
    this.rules = rules;
    const periods = rules.periods;
    byId("rules-head").replaceChildren(
      el("th", { text: "Command type" }),
      ...periods.map((p) => el("th", { text: p })),
      canWrite ? el("th", { text: "" }) : null,
    );
    const rows = rules.command_types.map((command) => {
      const limits = rules.defaults[command] || {};
      const inputs = periods.map((period) => {
        const value = limits[period];
        const input = el("input", {
          class: "limit-input",
          attrs: {
            type: "text",
            inputmode: "numeric",
            autocomplete: "off",
            placeholder: "unlimited",
            "aria-label": `${command} ${period} default limit`,
            "data-period": period,
            readonly: !canWrite,
          },
        });
        input.value = value === null || value === undefined ? "" : String(value);
        return input;
      });
      const cells = inputs.map((input, i) => el("td", { attrs: { "data-label": periods[i] } }, [input]));
      const row = el("tr", { attrs: { "data-command": command } }, [
        el("th", { text: command, attrs: { scope: "row" } }),
        ...cells,
      ]);
      if (canWrite) {
        const save = el("button", { class: "btn btn-small", text: "Save", attrs: { type: "button" } });
        save.addEventListener("click", () => this.save(command, inputs, save));
        row.append(el("td", {}, [save]));
      }
      return row;
    });
    byId("rules-body").replaceChildren(...rows);
  }

  _overrides(items) {
    const rows = items.map((o) => {
      const row = el("tr", {}, [
        el("td", { text: o.username, attrs: { "data-label": "User" } }),
        el("td", { text: o.command_type, attrs: { "data-label": "Command type" } }),
        el("td", { text: o.period, attrs: { "data-label": "Period" } }),
        el("td", { text: formatLimit(o.limit), attrs: { "data-label": "Limit" } }),
        el("td", { text: formatTime(o.updated_at), attrs: { "data-label": "Updated" } }),
      ]);
      if (canWrite) {
        const remove = el("button", { class: "btn btn-small btn-ghost", text: "Remove", attrs: { type: "button" } });
        remove.addEventListener("click", () =>
          this.removeOverride(o.username, o.command_type, o.period, remove),
        );
        row.append(el("td", {}, [remove]));
      }
      return row;
    });
    byId("overrides-body").replaceChildren(...rows);
    byId("overrides-empty").hidden = rows.length > 0;
  }

  async save(command, inputs, button) {
    const limits = {};
    for (const input of inputs) {
      const parsed = parseLimit(input.value);
      if (parsed.error) {
        toast(`${command} ${input.dataset.period}: enter a whole number or leave it empty`, "error");
        input.focus();
        return;
      }
      limits[input.dataset.period] = parsed.inherit ? null : parsed.limit;
    }
    button.disabled = true;
    try {
      await request("PUT", `/rules/${encodeURIComponent(command)}`, { body: { limits } });
      toast(`Default limits of ${command} saved`, "success", 3000);
    } catch (err) {
      reportError(err, `Saving ${command}`);
    } finally {
      button.disabled = false;
    }
  }

  async removeOverride(username, command, period, button) {
    button.disabled = true;
    try {
      const path = `/users/${encodeURIComponent(username)}/limits/${encodeURIComponent(command)}`;
      await request("DELETE", path, { query: { period } });
      toast(`Override removed: ${username} ${command} ${period}`, "success", 3000);
    } catch (err) {
      button.disabled = false;
      reportError(err, "Removing the override");
    }
  }
}

export class AuditPanel {
  constructor() {
    this.page = 1;
    this.pages = 1;
    this.refreshSoon = throttle(() => this.refresh(), 1000);
    byId("audit-prev").addEventListener("click", () => this.go(this.page - 1));
    byId("audit-next").addEventListener("click", () => this.go(this.page + 1));
  }

  go(page) {
    if (page < 1 || page > this.pages) return;
    this.page = page;
    this.refresh();
  }

  async refresh() {
    try {
      const response = await get("/audit", { page: this.page, per_page: 25 });
      this.pages = response.pages;
      const rows = response.items.map((entry) =>
        el("tr", {}, [
          el("td", { text: formatTime(entry.created_at), attrs: { "data-label": "Time" } }),
          el("td", { text: entry.actor, attrs: { "data-label": "Actor" } }),
          el("td", { text: entry.action, attrs: { "data-label": "Action" } }),
          el("td", { text: entry.target, attrs: { "data-label": "Target" } }),
          el("td", { class: "details", text: JSON.stringify(entry.details), attrs: { "data-label": "Details" } }),
        ]),
      );
      if (!rows.length) {
        rows.push(el("tr", {}, [el("td", { class: "empty-row", text: "Nothing audited yet.", attrs: { colspan: 5 } })]));
      }
      byId("audit-body").replaceChildren(...rows);
      setText("audit-page", `page ${response.page} of ${response.pages}`);
      byId("audit-prev").disabled = response.page <= 1;
      byId("audit-next").disabled = response.page >= response.pages;
    } catch (err) {
      reportError(err, "Loading the audit log");
    }
  }
}
