// The Rules tab (global defaults, per-user overrides) and the Audit log tab.
//
// Live changes never overwrite an edit: a row whose field has focus or holds unsaved text
// keeps what the admin typed, and says who changed the limit meanwhile, with a button that
// loads the new values. Saving a jump of more than 10x asks first (edits.js).

import { get, request } from "./api.js";
import { byId, el, formatLimit, formatTime, setText, throttle, userLink } from "./dom.js";
import { confirmJumps, selectOnFocus } from "./edits.js";
import { announce, canWrite, reportError, toast } from "./ui.js";
import { parseLimit } from "./users.js";

export class RulesPanel {
  constructor() {
    this.rules = null;
    this.changedBy = new Map(); // command type -> actor of the last live change
    this.refreshSoon = throttle(() => this.refresh(), 1000);
  }

  /** A `quota_change` event: remember who changed a global default, then reload. */
  noteChange(msg) {
    const d = msg.data;
    if (d.scope === "global" && d.command_type) this.changedBy.set(d.command_type, d.actor || "another admin");
    this.refreshSoon();
  }

  /** Whether the admin is editing `row`: a field has focus, or text that is not saved. */
  static editing(row) {
    return [...row.querySelectorAll("input.limit-input")].some(
      (input) => input === document.activeElement || input.value !== input.dataset.original,
    );
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

  /** The "Add an override" form: a user's limit for one type and period, asked first
   * when it jumps more than 10x from the limit that applies to that user now. */
  _setupForm(rules) {
    const fill = (id, values) => {
      const select = byId(id);
      const chosen = select.value;
      select.replaceChildren(...values.map((v) => el("option", { text: v, attrs: { value: v } })));
      if (values.includes(chosen)) select.value = chosen;
    };
    fill("override-type", rules.command_types);
    fill("override-period", rules.periods);
    if (this.formReady || !canWrite) return;
    this.formReady = true;
    byId("override-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.addOverride();
    });
  }

  async addOverride() {
    const username = byId("override-user").value.trim();
    const command = byId("override-type").value;
    const period = byId("override-period").value;
    const parsed = parseLimit(byId("override-limit").value);
    setText("override-error", "");
    if (!username || parsed.error || parsed.inherit) {
      setText("override-error", "enter a user and a whole number or \"unlimited\"");
      return;
    }
    let before = this.rules.defaults[command]?.[period] ?? null;
    try {
      const detail = await get(`/users/${encodeURIComponent(username)}`);
      before = detail.limits[command][period].limit;
    } catch (err) {
      if (err.status !== 404) {
        setText("override-error", err.message);
        return;
      }
    }
    if (!(await confirmJumps([{ label: `${username} ${command} ${period}`, before, after: parsed.limit }]))) return;
    byId("override-add").disabled = true;
    try {
      const path = `/users/${encodeURIComponent(username)}/limits/${encodeURIComponent(command)}`;
      await request("PUT", path, { body: { limits: { [period]: parsed.limit } } });
      toast(`Override added: ${username} ${command} ${period}`, "success", 3000);
      byId("override-limit").value = "";
      this.refresh();
    } catch (err) {
      setText("override-error", err.message);
    } finally {
      byId("override-add").disabled = false;
    }
  }

  render(rules) {
    this.rules = rules;
    this._setupForm(rules);
    const periods = rules.periods;
    byId("rules-head").replaceChildren(
      el("th", { text: "Command type" }),
      ...periods.map((p) => el("th", { text: p })),
      canWrite ? el("th", { text: "" }) : null,
    );
    const shown = new Map(
      [...byId("rules-body").querySelectorAll("tr[data-command]")].map((r) => [r.dataset.command, r]),
    );
    const rows = rules.command_types.map((command) => {
      const limits = rules.defaults[command] || {};
      const old = shown.get(command);
      if (old && RulesPanel.editing(old)) return this._keep(old, command, limits, periods);
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
        input.dataset.original = input.value;
        selectOnFocus(input);
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
    // A kept row must never leave the document (a detached field loses its focus): when
    // the rows are the same command types in the same order, swap the others one by one.
    const same = rows.length === shown.size && rules.command_types.every((c, i) => [...shown.keys()][i] === c);
    if (same) {
      for (const row of rows) {
        const old = shown.get(row.dataset.command);
        if (old !== row) old.replaceWith(row);
      }
    } else {
      byId("rules-body").replaceChildren(...rows);
    }
  }

  /** An edited row stays; if the server's values differ from those it was loaded with, a
   * notice says who changed them and offers to load them (dropping the edit). */
  _keep(row, command, limits, periods) {
    const inputs = [...row.querySelectorAll("input.limit-input")];
    const fresh = periods.map((p) => (limits[p] === null || limits[p] === undefined ? "" : String(limits[p])));
    if (inputs.every((input, i) => input.value === fresh[i])) {
      // The server now holds exactly what is typed (this admin's own save): nothing is lost.
      inputs.forEach((input, i) => (input.dataset.original = fresh[i]));
      row.querySelector(".row-notice")?.remove();
      return row;
    }
    if (inputs.every((input, i) => input.dataset.original === fresh[i])) return row; // unchanged
    row.querySelector(".row-notice")?.remove();
    const who = this.changedBy.get(command) || "another admin";
    const load = el("button", { class: "btn btn-small btn-ghost", text: "Reload", attrs: { type: "button" } });
    const notice = el("div", { class: "row-notice" }, [
      el("span", { text: `Changed by ${who}: ${periods.map((p, i) => `${p} ${fresh[i] || "unlimited"}`).join(", ")}. ` }),
      load,
    ]);
    load.addEventListener("click", () => {
      for (const input of inputs) input.value = input.dataset.original; // not editing any more
      notice.remove();
      this.refresh();
    });
    row.querySelector("th").append(notice);
    announce(notice.firstChild.textContent);
    return row;
  }

  _overrides(items) {
    const rows = items.map((o) => {
      const row = el("tr", {}, [
        el("td", { attrs: { "data-label": "User" } }, [userLink(o.username)]),
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
    const jumps = [];
    for (const input of inputs) {
      const parsed = parseLimit(input.value);
      if (parsed.error) {
        toast(`${command} ${input.dataset.period}: enter a whole number or leave it empty`, "error");
        input.focus();
        return;
      }
      limits[input.dataset.period] = parsed.inherit ? null : parsed.limit;
      const before = input.dataset.original === "" ? null : Number(input.dataset.original);
      jumps.push({ label: `${command} ${input.dataset.period}`, before, after: limits[input.dataset.period] });
    }
    if (!(await confirmJumps(jumps))) return;
    button.disabled = true;
    try {
      await request("PUT", `/rules/${encodeURIComponent(command)}`, { body: { limits } });
      for (const input of inputs) {
        const saved = limits[input.dataset.period];
        input.value = input.dataset.original = saved === null ? "" : String(saved);
      }
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

/** An audit row's details as people read them: "daily 800 → 800,800" where the row has
 * before and after, the other fields as JSON. */
export function describeAudit(details) {
  if (!details || !details.before || !details.after) return JSON.stringify(details);
  const changes = Object.keys(details.after).map(
    (p) => `${p} ${formatLimit(details.before[p])} → ${formatLimit(details.after[p])}`,
  );
  const rest = { ...details };
  for (const key of ["before", "after", "limits", "periods"]) delete rest[key];
  const extra = Object.keys(rest).length ? ` ${JSON.stringify(rest)}` : "";
  return changes.join(", ") + extra;
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
          el("td", { class: "details", text: describeAudit(entry.details), attrs: { "data-label": "Details" } }),
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
