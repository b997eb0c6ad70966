// The admin REST API from the page: JSON in and out, the XSRF header on writes, the
// server's error envelope turned into an ApiFailure with its code and message.

export const API = "/api/admin/quotas";

export class ApiFailure extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function xsrfToken() {
  // Tornado's _xsrf cookie is readable by design; the page's copy is the fallback.
  const match = document.cookie.match(/(?:^|;\s*)_xsrf=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : document.body.dataset.xsrf || "";
}

let onUnauthorized = () => {};

/** Called once when the session is gone (401): the page tells the user to sign in. */
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

/**
 * request("GET", "/users", {query: {q: "al"}}) or request("PUT", path, {body: {...}}).
 * Paths starting with "/api" or "/logout" are used as they are; others get the API prefix.
 */
export async function request(method, path, { query, body, accept } = {}) {
  let url = path.startsWith("/api") || path.startsWith("/logout") ? path : API + path;
  if (query) {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(query)) {
      if (Array.isArray(value)) value.forEach((v) => params.append(key, v));
      else if (value !== undefined && value !== null && value !== "") params.append(key, value);
    }
    const text = params.toString();
    if (text) url += `?${text}`;
  }
  const headers = { Accept: accept || "application/json" };
  if (method !== "GET") headers["X-XSRFToken"] = xsrfToken();
  const init = { method, headers, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    throw new ApiFailure(0, "network", "the server cannot be reached");
  }
  let payload = null;
  const type = response.headers.get("Content-Type") || "";
  if (type.includes("application/json")) {
    try {
      payload = await response.json();
    } catch (err) {
      payload = null;
    }
  }
  if (!response.ok) {
    const error = (payload && payload.error) || {};
    if (response.status === 401) onUnauthorized();
    throw new ApiFailure(response.status, error.code || "error", error.message || response.statusText);
  }
  return payload;
}

export const get = (path, query) => request("GET", path, { query });

/** The URL of an API path with a query (empty values left out), e.g. for a download link. */
export function csvUrl(path, query) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) if (value) params.append(key, value);
  const text = params.toString();
  return API + path + (text ? `?${text}` : "");
}
