// Small DOM helpers. Data only ever reaches the page as text (textContent or attribute
// values): nothing here parses HTML, so a user name like <img src=x onerror=...> stays
// a string of characters.

/** Create an element: el("td", {class: "num", text: "12", attrs: {"data-label": "Used"}}). */
export function el(tag, options = {}, children = []) {
  const node = document.createElement(tag);
  if (options.class) node.className = options.class;
  if (options.text !== undefined && options.text !== null) node.textContent = String(options.text);
  for (const [name, value] of Object.entries(options.attrs || {})) {
    if (value !== undefined && value !== null && value !== false) node.setAttribute(name, String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

/** The path of a user's view (/admin/quotas/users/<name>); every name links there. */
export function userPath(username) {
  return `/admin/quotas/users/${encodeURIComponent(username)}`;
}

/** A link to a user's view, the name as text. */
export function userLink(username, className = "username") {
  return el("a", { class: className, text: username, attrs: { href: userPath(username) } });
}

export function byId(id) {
  return document.getElementById(id);
}

export function setText(idOrNode, value) {
  const node = typeof idOrNode === "string" ? byId(idOrNode) : idOrNode;
  if (node) node.textContent = value === undefined || value === null ? "" : String(value);
}

export function clear(node) {
  node.replaceChildren();
}

/** A clone of <template id=...>'s first element. */
export function fromTemplate(id) {
  return byId(id).content.firstElementChild.cloneNode(true);
}

const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const decimal = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

export function formatInt(value) {
  return typeof value === "number" && Number.isFinite(value) ? integer.format(value) : "—";
}

export function formatPercent(value) {
  return typeof value === "number" && Number.isFinite(value) ? `${decimal.format(value)}%` : "—";
}

export function formatLimit(value) {
  return value === null || value === undefined ? "∞" : integer.format(value);
}

/** "14:03:07" today, else "Mar 9 14:03". */
export function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const now = new Date();
  const sameDay = date.toDateString() === now.toDateString();
  return sameDay
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" })
    : date.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
}

/** Run `fn` at most once per `ms`, after the last call (for refreshes after bursts). */
export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

/** Run `fn` at most once per `ms`: now if idle, else once more at the end of the period.
 * Unlike a debounce, a steady stream of calls cannot postpone it forever. */
export function throttle(fn, ms) {
  let last = 0;
  let timer = null;
  return (...args) => {
    const wait = last + ms - Date.now();
    if (wait <= 0 && !timer) {
      last = Date.now();
      fn(...args);
    } else if (!timer) {
      timer = setTimeout(() => {
        timer = null;
        last = Date.now();
        fn(...args);
      }, Math.max(wait, 0));
    }
  };
}
