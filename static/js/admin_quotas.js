// The admin dashboard: loads its data over the admin REST API, then follows the live
// stream (WebSocket, or SSE when a WebSocket cannot connect) from the seq it loaded.
//
// Recovery: a reconnect resumes from the last seq seen; the server replays what was
// missed, or says `recovered: false`, and then the page reloads its data over REST.
// Violations are keyed by seq, so none is shown twice; none is lost because the stream
// always resumes from a seq the page has already applied.

import { get, request, setUnauthorizedHandler } from "./admin/api.js";
import { byId, formatInt, formatPercent, setText } from "./admin/dom.js";
import { AlertFeed, ViolationFeed } from "./admin/feeds.js";
import { LiveCharts } from "./admin/live_charts.js";
import { BackgroundAlerts } from "./admin/notifications.js";
import { PluginPanel } from "./admin/plugin_panel.js";
import { AuditPanel, RulesPanel } from "./admin/settings.js";
import { LiveStream, describeStatus } from "./admin/stream.js";
import { announce, canWrite, reportError, showSignedOut, toast } from "./admin/ui.js";
import { readState, writeState } from "./admin/url_state.js";
import { UserPage } from "./admin/user_page.js";
import { LimitsDialog, ResetDialog, UsersTable } from "./admin/users.js";


const stats = {};
const violations = new ViolationFeed();
const alerts = new AlertFeed();
const background = new BackgroundAlerts(); // the tab title's count, opt-in notifications
const charts = new LiveCharts();
const rules = new RulesPanel();
const audit = new AuditPanel();
// The stats fields the page shows itself: each element that renders one names it.
const ownFields = document.querySelectorAll("main [data-field], #db-banner");
const plugins = new PluginPanel(
  (document.body.dataset.pluginTypes || "").split(",").filter(Boolean),
  new Set([...ownFields].map((node) => node.dataset.field)),
);
const limitsDialog = new LimitsDialog();
const resetDialog = new ResetDialog();
const users = new UsersTable({
  onEdit: (name) => limitsDialog.open(name),
  onReset: (name) => resetDialog.open(name, users.commandTypes),
});
// /admin/quotas/users/<name> opens the same page on that user's view.
const userPage = document.body.dataset.user ? new UserPage(document.body.dataset.user) : null;
let currentTab = "live";
let replay = null; // {count, report} while a resumed connection replays what was missed
let connectedBefore = false;
let statsFromStream = false;

// -- overview cards ------------------------------------------------------------------
function applyStats(data) {
  if (data.delta === false) for (const key of Object.keys(stats)) delete stats[key];
  Object.assign(stats, data);
  delete stats.delta;
  // A card shows while its field comes (the analytics plugin's go with the plugin).
  for (const card of document.querySelectorAll(".cards[aria-label=Overview] article[data-field]")) {
    const field = card.dataset.field;
    card.hidden = !(field in stats);
    const value = byId(`stat-${field}`);
    if (value && field in stats) value.textContent = formatInt(stats[field]);
  }
  // The server says so in every stats snapshot: false while its database calls fail.
  byId("db-banner").hidden = stats.database_available !== false;
  const load = stats.system_load;
  // Nothing measured yet reads 0 % for both: show "not measured" rather than a fake zero.
  const measured = load && (load.cpu_percent > 0 || load.memory_percent > 0);
  setText("stat-cpu", measured ? formatPercent(load.cpu_percent) : "—");
  setText("stat-memory", measured ? formatPercent(load.memory_percent) : "—");
  setText("stat-cpu-sub", measured ? "host" : "not measured");
  if (load) {
    const factor = load.throttle_factor;
    setText("stat-throttle", factor.toFixed(2));
    const average = stats.average_throttle_factor;
    const tail = typeof average === "number" ? ` · avg ${average.toFixed(2)} (5 min)` : "";
    const [state, short, why] = explainThrottle(factor);
    setText("stat-throttle-sub", `${state}${tail}`);
    setText("stat-throttle-why", short);
    const card = byId("stat-throttle").closest(".card");
    card.title = why;
    card.classList.toggle("card-alert", load.throttle_active);
    byId("stat-load_refusals_today").closest(".card").classList.toggle("card-alert", factor <= 0);
  }
  plugins.figures(stats);
}

/** What a throttle factor means for callers: [state, a few words, one sentence]. */
function explainThrottle(factor) {
  // The short line fits the card; the card's title has the whole sentence.
  if (factor >= 1) return ["not throttling", "quota decides alone", "1.00: load is below every band; consumes are decided by quota only"];
  if (factor <= 0) return ["refusing for load", "every consume: 503", "0.00: every consume is answered 503 system_overloaded until load drops"];
  const share = Math.round(factor * 100);
  return [
    "slow down asked",
    `callers: ${share}% of their rate`,
    `${factor.toFixed(2)}: consumes are still decided by quota; callers are asked to send ${share}% of their rate`,
  ];
}

// -- the stream ------------------------------------------------------------------------
function onMessage(msg, info) {
  if (userPage) userPage.apply(msg);
  switch (msg.type) {
    case "welcome":
      // Events replayed right after the first connection are just the ones that happened
      // while the page loaded: only a reconnect reports what was missed.
      replay = info.resumed ? { count: 0, report: connectedBefore } : null;
      connectedBefore = true;
      break;
    case "stats":
      statsFromStream = true;
      applyStats(msg.data);
      charts.stats(msg);
      break;
    case "violation":
      if (violations.add(msg)) {
        charts.violation(msg);
        if (replay) replay.count += 1;
        else toast(`${msg.data.username}: ${msg.data.message}`, "warn", 5000, "violation");
        users.applyViolation(msg);
      }
      break;
    case "alert":
      background.alert(msg, Boolean(replay));
      if (alerts.apply(msg) && !replay && !msg.data.update) {
        toast(`Alert (${msg.data.severity}): ${msg.data.message}`, "error");
      }
      if (currentTab === "audit") audit.refreshSoon();
      break;
    case "usage":
      // Admitted commands, coalesced by the server: the Users tab updates in place.
      users.applyUsage(msg.data);
      break;
    case "quota_change":
      users.applyQuotaChange(msg);
      limitsDialog.noteChange(msg);
      // Hidden tabs load fresh data when they are opened.
      if (currentTab === "rules") rules.noteChange(msg);
      if (currentTab === "audit") audit.refreshSoon();
      break;
    case "throttle":
      if (!replay) {
        const f = msg.data.throttle_factor;
        const text = msg.data.throttle_active ? `Throttling: factor ${f}` : "Throttling ended";
        toast(text, msg.data.throttle_active ? "warn" : "info", 5000, "throttle");
      }
      break;
    case "recovered":
      if (!msg.data.recovered) {
        // An unknown cursor means another event log (a new database): forget every seq.
        const fresh = msg.data.reason === "unknown_cursor" || msg.data.reason === "invalid_cursor";
        if (fresh) {
          violations.reset();
          alerts.reset();
          plugins.reset();
        }
        reloadAll("the server could not replay everything missed");
      } else if (replay && replay.report && replay.count) {
        toast(`${replay.count} violation(s) arrived while disconnected`, "info");
      }
      replay = null;
      break;
    default:
      if (plugins.shows(msg.type)) plugins.add(msg);
      break;
  }
}

let announcedState = null;

function onStatus(status) {
  const conn = byId("conn");
  // Announced on a change of state only: the countdown ticks every 250 ms.
  if (status.state !== announcedState && announcedState !== null) announce(`Live updates: ${describeStatus(status)}`);
  announcedState = status.state;
  conn.dataset.state = status.state;
  setText("conn-text", describeStatus(status));
  const transport = status.transport === "sse" ? "via SSE" : status.transport === "websocket" ? "via WebSocket" : "";
  setText("conn-transport", transport);
  // Quiet while connected; loud only once the page has stopped trying on its own.
  byId("reconnect").classList.toggle("btn-ghost", status.state !== "disconnected");
  byId("reconnect").classList.toggle("btn-attention", status.state === "disconnected");
  showStale(status.state !== "connected");
}

// While not connected every figure and chart is as old as the last message: say so.
function showStale(stale) {
  document.body.classList.toggle("stale", stale);
  const asOf = byId("as-of");
  const at = stream && stream.lastLiveAt;
  asOf.hidden = !stale || !at;
  if (at) {
    const time = new Date(at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
    setText(asOf, `as of ${time}`);
  }
}

const stream = new LiveStream({
  wsPath: "/ws/admin/quotas",
  ssePath: "/sse/admin/quotas",
  onMessage,
  onStatus,
  serverTypes: (document.body.dataset.serverTypes || "").split(",").filter(Boolean),
});

// -- loading over REST -----------------------------------------------------------------
async function loadFeeds() {
  const pluginQuery = plugins.query();
  const [feed, alertList, pluginFeed] = await Promise.all([
    get("/events", { types: "violation", limit: 100 }),
    alerts.reload(),
    pluginQuery ? get("/events", pluginQuery) : null,
  ]);
  violations.load(feed);
  if (pluginFeed) plugins.load(pluginFeed);
  // Resume from the oldest of the snapshots: nothing in between can be missed, and
  // what they already hold is recognised by its seq.
  return Math.min(feed.seq, alertList.seq, pluginFeed ? pluginFeed.seq : Infinity);
}

async function loadStats() {
  try {
    const response = await get("/stats");
    // For the first paint only: once the stream has sent stats, they are newer.
    if (!statsFromStream) applyStats({ delta: false, ...response.stats });
  } catch (err) {
    reportError(err, "Loading stats");
  }
}

async function reloadAll(reason) {
  window.quotaDashboard.reloads += 1;
  if (reason) toast(`Reloading: ${reason}`, "info", 4000);
  try {
    await loadFeeds();
  } catch (err) {
    reportError(err, "Reloading feeds");
  }
  charts.loadHistory();
  charts.loadDaily();
  background.refresh();
  if (userPage) userPage.start();
  if (currentTab === "users") users.refresh();
  if (currentTab === "rules") rules.refresh();
  if (currentTab === "audit") audit.refresh();
}

// -- URL state -------------------------------------------------------------------------
const TABS = ["live", "users", "rules", "audit"];
const SORTS = ["utilization", "username", "violations"];

function saveState(push) {
  if (userPage) return; // a user's view is its path
  writeState(
    {
      tab: currentTab,
      q: users.q,
      sort: users.sort,
      page: String(users.page),
      vuser: violations.filter.user,
      vtype: violations.filter.type,
    },
    push,
  );
}

/** Show what a URL says (on load, and on Back/Forward). */
function applyState(state) {
  users.q = state.q.slice(0, 64);
  byId("users-search").value = users.q;
  users.sort = SORTS.includes(state.sort) ? state.sort : "utilization";
  byId("users-sort").value = users.sort;
  users.page = Math.max(1, Number.parseInt(state.page, 10) || 1);
  const filter = violations.filter;
  if (filter.user !== state.vuser || filter.type !== state.vtype) {
    byId("violations-user").value = state.vuser;
    byId("violations-type").value = state.vtype;
    violations.setFilter({ user: state.vuser, type: state.vtype });
  }
  showTab(TABS.includes(state.tab) ? state.tab : "live", false);
}

// -- tabs and header -------------------------------------------------------------------
function showTab(name, record = true) {
  currentTab = name;
  if (record) saveState(true);
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const selected = tab.id === `tab-${name}`;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1; // roving: Tab enters the tab list at the selected one
    byId(tab.getAttribute("aria-controls")).hidden = !selected;
  }
  if (name === "live") charts.drawAll();
  if (name === "users") users.refresh();
  if (name === "rules") rules.refresh();
  if (name === "audit") audit.refresh();
}

function setupHeader() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener("click", () => showTab(tab.id.replace("tab-", "")));
    tab.tabIndex = tab.getAttribute("aria-selected") === "true" ? 0 : -1;
  }
  // The WAI-ARIA tabs pattern: arrows move (and select), Home and End jump, both wrap.
  document.querySelector('[role="tablist"]').addEventListener("keydown", (event) => {
    const at = tabs.indexOf(document.activeElement);
    if (at === -1) return;
    const to = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: tabs.length - 1 }[event.key];
    if (to === undefined) return;
    event.preventDefault();
    const tab = tabs[(to + tabs.length) % tabs.length];
    tab.focus();
    showTab(tab.id.replace("tab-", ""));
  });
  byId("reconnect").addEventListener("click", () => stream.reconnectNow());
  byId("reload").addEventListener("click", () => reloadAll(null));
  byId("logout").addEventListener("click", async () => {
    try {
      await request("POST", "/logout");
    } catch (err) {
      if (err.status !== 401) {
        reportError(err, "Logging out");
        return;
      }
    }
    window.location.assign("/login");
  });
  setUnauthorizedHandler(showSignedOut);
  document.body.classList.toggle("can-write", canWrite);
  background.mount(byId("reload"));
}

function showUserView() {
  document.querySelector("nav.tabs").hidden = true;
  for (const panel of document.querySelectorAll('[role="tabpanel"]')) panel.hidden = true;
  byId("panel-user").hidden = false;
  currentTab = "user";
  userPage.start();
}

// "Today" is the server's day (quotas.timezone); times are shown in this browser's zone.
function labelZones() {
  const server = document.body.dataset.timezone || "UTC";
  const local = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
  const same = server === local ? " (the same)" : "";
  setText("zone-note", `"Today" is the day in ${server} (the server's quota time zone); times are in ${local}${same}.`);
}

async function main() {
  setupHeader();
  labelZones();
  if (userPage) showUserView();
  users.onState = () => saveState(false);
  violations.onState = () => saveState(false);
  const types = get("/rules")
    .then((r) => violations.setTypes(r.command_types))
    .catch((err) => reportError(err, "Loading the command types"));
  if (!userPage) {
    const state = readState();
    if (state.vtype) await types; // the option must exist before it is selected
    applyState(state);
    window.addEventListener("popstate", () => applyState(readState()));
  }
  loadStats();
  charts.loadHistory();
  charts.loadDaily();
  try {
    stream.lastSeq = await loadFeeds();
  } catch (err) {
    reportError(err, "Loading the feeds");
  }
  // Nothing is polled: the stream keeps every view current; reloads happen when asked
  // (the Reload button, opening a tab) or after the server says `recovered: false`.
  stream.start();
}

// Exposed for tests and debugging: the stream's state, read-only use.
window.quotaDashboard = { stream, violations, alerts, stats, users, plugins, charts, userPage, reloads: 0 };

main();
