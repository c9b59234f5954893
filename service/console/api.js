// The public HTTP API, with the API key from sessionStorage, and errors worded for a person.

const KEY = "mend.apiKey";

export const session = {
  get key() { return sessionStorage.getItem(KEY) || ""; },
  set key(value) { if (value) sessionStorage.setItem(KEY, value); else sessionStorage.removeItem(KEY); },
  role: null,        // reader | editor | admin, once signed in
  authOff: false,    // the service has no keys configured
};

const RANK = { reader: 0, editor: 1, admin: 2 };
export const can = (role) => session.role !== null && RANK[session.role] >= RANK[role];

export class ApiError extends Error {
  constructor(status, detail, body) {
    super(describe(status, detail));
    this.status = status;
    this.detail = detail;
    this.body = body;
  }
}

export function authHeaders(extra = {}) {
  const headers = { Accept: "application/json", ...extra };
  if (session.key) headers.Authorization = `Bearer ${session.key}`;
  return headers;
}

/** Build a relative URL (resolved against /console, so the service may sit under a path prefix). */
export function url(path, params) {
  const qs = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) if (v !== "" && v !== null && v !== undefined) qs.set(k, v);
  const s = qs.toString();
  return s ? `${path}?${s}` : path;
}

/** Call the API; JSON in and out; throws ApiError with a readable message. */
export async function api(path, { method = "GET", body, params, text = false } = {}) {
  let resp;
  try {
    resp = await fetch(url(path, params), {
      method, cache: "no-store",
      headers: authHeaders(body === undefined ? {} : { "Content-Type": "application/json" }),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, err.message);
  }
  const raw = await resp.text();
  let data = raw;
  if (!text) { try { data = raw ? JSON.parse(raw) : null; } catch { data = raw; } }
  if (!resp.ok) {
    let parsed = data;
    if (text) { try { parsed = JSON.parse(raw); } catch { parsed = raw; } }
    throw new ApiError(resp.status, detailOf(parsed), parsed);
  }
  return data;
}

/** The service's error detail as one line (422 lists every field with its message). */
export function detailOf(data) {
  if (data && typeof data === "object") {
    const d = data.detail;
    if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
    if (typeof d === "string") return d;
    return JSON.stringify(data).slice(0, 300);
  }
  return typeof data === "string" ? data.slice(0, 300) : "";
}

export function describe(status, detail) {
  const why = detail ? ` (${detail})` : "";
  switch (status) {
    case 0: return `Cannot reach the service${why}.`;
    case 401: return `Not authorised (401): the API key is missing or was not accepted${why}. Enter a valid key.`;
    case 403: return `Forbidden (403): this key's role may not do that${why}.`;
    case 404: return `Not found (404)${why}.`;
    case 409: return `Conflict (409)${why}.`;
    case 422: return `Rejected (422)${why}.`;
    case 503: return `Service unavailable (503)${why}.`;
    case 504: return `Timed out (504)${why}.`;
    default: return `Error ${status}${why}.`;
  }
}

/**
 * The key's role, found with the public API alone: GET /edits needs reader; POST /edit and
 * POST /rollback with an empty body answer 403 below their role and 422 (nothing done) otherwise.
 */
export async function probeRole() {
  await api("edits", { params: { limit: 1 } });
  const allowed = async (path) => {
    try {
      await api(path, { method: "POST", body: {} });
      return true;
    } catch (err) {
      if (err.status === 422) return true;
      if (err.status === 403) return false;
      throw err;
    }
  };
  if (!(await allowed("edit"))) return "reader";
  return (await allowed("rollback")) ? "admin" : "editor";
}

/** GET /edits with `params`; a limit above the service's max_page_size is lowered to it and retried. */
export async function listEdits(params) {
  try {
    return await api("edits", { params });
  } catch (err) {
    const most = err.status === 422 && /max_page_size=(\d+)/.exec(err.detail || "");
    if (!most) throw err;
    return api("edits", { params: { ...params, limit: Number(most[1]) } });
  }
}
