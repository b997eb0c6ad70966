// The dashboard's state in its URL (?tab=users&q=al&sort=violations&page=2&vuser=bob&vtype=shell),
// so a reload, a bookmark or a shared link opens the same view, and Back/Forward step
// through the tabs. A user's view has its own path (/admin/quotas/users/<name>).

const KEYS = ["tab", "q", "sort", "page", "vuser", "vtype"];
const DEFAULTS = { tab: "live", q: "", sort: "utilization", page: "1", vuser: "", vtype: "" };

/** The state the URL holds, defaults filled in. */
export function readState() {
  const params = new URLSearchParams(location.search);
  const state = { ...DEFAULTS };
  for (const key of KEYS) if (params.has(key)) state[key] = params.get(key);
  return state;
}

/** Put `state` in the URL: a new history entry when `push` (a tab change), else in place. */
export function writeState(state, push = false) {
  const params = new URLSearchParams();
  for (const key of KEYS) if (state[key] && state[key] !== DEFAULTS[key]) params.set(key, state[key]);
  const text = params.toString();
  const url = location.pathname + (text ? `?${text}` : "") + location.hash;
  if (url === location.pathname + location.search + location.hash) return;
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}
