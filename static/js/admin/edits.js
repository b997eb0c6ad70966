// What keeps an admin's edit safe: a limit field selects its value when entered (typing
// replaces "800" instead of making it "800800"), and a change of more than 10x up or down
// asks first, in one dialog listing every such change.

import { byId, el, formatLimit, setText } from "./dom.js";

export const JUMP = 10; // a new limit above 10x or below 1/10 of the current one asks first

/** Make a limit input select its whole value when it gains focus (click or Tab). */
export function selectOnFocus(input) {
  let justFocused = false;
  input.addEventListener("focus", () => {
    input.select();
    justFocused = true;
  });
  // The click that focused the field would otherwise put the caret where it landed.
  input.addEventListener("mouseup", (event) => {
    if (justFocused) event.preventDefault();
    justFocused = false;
  });
}

/** Whether going from limit `before` to `after` (null = unlimited) is a large jump. */
export function isLargeJump(before, after) {
  if (typeof before !== "number" || typeof after !== "number") return false;
  if (before === 0) return after >= JUMP;
  return after > before * JUMP || after < before / JUMP;
}

/**
 * Ask before saving large jumps. `changes` is [{label, before, after}]; resolves true when
 * there is none, or when the admin confirms.
 */
export function confirmJumps(changes) {
  const large = changes.filter((c) => isLargeJump(c.before, c.after));
  if (!large.length) return Promise.resolve(true);
  const dialog = byId("confirm-dialog");
  byId("confirm-list").replaceChildren(
    ...large.map((c) =>
      el("li", { text: `${c.label}: ${formatLimit(c.before)} → ${formatLimit(c.after)}` }),
    ),
  );
  setText("confirm-title", large.length === 1 ? "Confirm a large change" : `Confirm ${large.length} large changes`);
  return new Promise((resolve) => {
    const done = (ok) => {
      byId("confirm-yes").removeEventListener("click", yes);
      dialog.removeEventListener("close", no);
      if (dialog.open) dialog.close();
      resolve(ok);
    };
    const yes = () => done(true);
    const no = () => done(false);
    byId("confirm-yes").addEventListener("click", yes);
    dialog.addEventListener("close", no); // Cancel, Escape
    dialog.showModal();
    byId("confirm-no").focus(); // the safe choice is the default one
  });
}
