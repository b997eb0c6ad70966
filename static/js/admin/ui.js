// Page-wide bits: who is looking (admin or viewer), toasts, error reporting.

import { byId, el } from "./dom.js";

export const canWrite = document.body.dataset.role === "admin";
export const actor = document.body.dataset.actor || "";

const MAX_TOASTS = 3;
const keyed = new Map(); // key -> {node, timer, repeats}

/** Say `text` through the page's one live region (screen readers read it once, politely). */
export function announce(text) {
  const region = byId("announcer");
  if (region) region.textContent = text;
}

/**
 * A short message in the corner; `kind` is info, success, warn or error. Toasts with the
 * same `key` replace each other (a burst of violations is one toast, counting the rest).
 */
export function toast(text, kind = "info", ms = 6000, key = null) {
  const box = byId("toasts");
  const current = key && keyed.get(key);
  if (current && current.node.isConnected) {
    current.repeats += 1;
    announce(text);
    current.node.textContent = `${text} (+${current.repeats} more)`;
    current.node.className = `toast toast-${kind}`;
    clearTimeout(current.timer);
    current.timer = setTimeout(() => current.node.remove(), ms);
    return current.node;
  }
  announce(text);
  const node = el("div", { class: `toast toast-${kind}`, text });
  box.append(node);
  while (box.children.length > MAX_TOASTS) box.firstElementChild.remove();
  const timer = setTimeout(() => node.remove(), ms);
  if (key) keyed.set(key, { node, timer, repeats: 0 });
  return node;
}

/** Tell the user a request failed, with the server's message. */
export function reportError(err, what) {
  if (err && err.status === 401) return; // the sign-in banner says it already
  const message = err && err.message ? err.message : String(err);
  toast(`${what}: ${message}`, "error", 8000);
}

/** Once the session is gone: a banner with a sign-in link (and no more retries). */
export function showSignedOut() {
  if (byId("signed-out")) return;
  const link = el("a", { text: "Sign in again", attrs: { href: "/login?next=%2Fadmin%2Fquotas" } });
  const banner = el("div", { class: "banner", attrs: { id: "signed-out", role: "alert" } }, [
    el("span", { text: "Your session has ended. " }),
    link,
  ]);
  document.body.prepend(banner);
}
