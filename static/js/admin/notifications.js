// A background tab tells you: the number of open, unacknowledged alerts in the tab title,
// and, once the admin asks for it (a button, never a prompt on load), a browser
// Notification for each new critical alert while the tab is hidden.
//
// The count is the server's (`counts.open` of GET /alerts), read again after alert events
// (at most once a second), so it matches the Alerts list whatever this page missed.

import { get } from "./api.js";
import { el, throttle } from "./dom.js";
import { reportError, toast } from "./ui.js";

const STORAGE_KEY = "quotaserver.notifications"; // "on" once the admin opted in

export class BackgroundAlerts {
  constructor() {
    this.baseTitle = document.title;
    this.open = 0;
    this.supported = "Notification" in window;
    this.enabled = this.supported && Notification.permission === "granted" && this._stored();
    this.refresh = throttle(() => this._loadCount(), 1000);
    this.button = el("button", {
      class: "btn btn-small btn-ghost",
      attrs: { type: "button", id: "notify-toggle" },
    });
    this.button.addEventListener("click", () => this._toggle());
    this.button.hidden = !this.supported;
    this._renderButton();
  }

  /** Put the opt-in button in the header, after `anchor`. */
  mount(anchor) {
    anchor.after(this.button);
    this._loadCount();
  }

  /** Every `alert` event from the stream; `replayed` while a reconnect catches up. */
  alert(msg, replayed) {
    this.refresh();
    const alert = msg.data;
    if (replayed || alert.update || alert.severity !== "critical") return;
    if (!this.enabled || document.visibilityState !== "hidden") return;
    const note = new Notification(`Critical alert: ${alert.alert_type}`, {
      body: alert.username ? `${alert.username}: ${alert.message}` : alert.message,
      tag: `quotaserver-alert-${alert.alert_id}`, // one per alert, even if sent twice
    });
    note.addEventListener("click", () => {
      window.focus();
      note.close();
    });
  }

  async _loadCount() {
    try {
      const response = await get("/alerts", { status: "open", per_page: 1 });
      this.open = response.counts.open;
    } catch (err) {
      return; // the title keeps the last count; the next event tries again
    }
    document.title = this.open > 0 ? `(${this.open}) ${this.baseTitle}` : this.baseTitle;
  }

  async _toggle() {
    if (this.enabled) {
      this.enabled = false;
      this._store(false);
      this._renderButton();
      return;
    }
    let permission = Notification.permission;
    try {
      if (permission === "default") permission = await Notification.requestPermission();
    } catch (err) {
      reportError(err, "Asking for notifications");
      return;
    }
    if (permission !== "granted") {
      toast("Notifications are blocked for this site: allow them in the browser's settings", "warn");
      return;
    }
    this.enabled = true;
    this._store(true);
    this._renderButton();
    toast("You will be notified of critical alerts while this tab is in the background", "info");
  }

  _renderButton() {
    this.button.textContent = this.enabled ? "Notifying" : "Notify me";
    this.button.setAttribute("aria-pressed", String(this.enabled));
    this.button.title = this.enabled
      ? "Critical alerts raise a browser notification while this tab is hidden (click to stop)"
      : "Get a browser notification for critical alerts while this tab is hidden";
  }

  _stored() {
    try {
      return window.localStorage.getItem(STORAGE_KEY) === "on";
    } catch (err) {
      return false; // storage disabled: opt in again after a reload
    }
  }

  _store(on) {
    try {
      if (on) window.localStorage.setItem(STORAGE_KEY, "on");
      else window.localStorage.removeItem(STORAGE_KEY);
    } catch (err) {
      /* storage disabled: the choice lasts until the page reloads */
    }
  }
}
