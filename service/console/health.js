// Health: readiness, version and methods (GET /health/ready), edits in the last hour (GET /edits),
// counters and p50 latencies (GET /metrics).

import { api, listEdits } from "./api.js";
import { $, el, fill } from "./dom.js";
import { histogramQuantile, parseMetrics, total } from "./metrics.js";

const KNOWN = new Set(["status", "version", "model", "fingerprint", "sha256", "active_edits", "methods",
  "default_method", "unavailable_methods", "error"]);
let wired = false;

export function init(ctx) {
  if (wired) return;
  wired = true;
  $("#health-refresh").addEventListener("click", () => show(ctx).catch((err) => ctx.banner(err.message)));
}

export function onOp(ctx) {
  if (ctx.current?.name === "health") show(ctx).catch((err) => ctx.banner(err.message));
}

const ms = (s) => (s === null ? "no data yet" : `${Math.round(s * 1000)} ms`);

export async function show() {
  const root = $("#health-body");
  const ready = await readiness();
  const [recent, metricsText] = await Promise.all([
    listEdits({ limit: 200 }).catch((err) => err),
    api("metrics", { text: true }).catch((err) => err),
  ]);
  const rows = [
    ["Ready", ready.status === "ready" ? "yes" : `no (${ready.status}${ready.error ? `: ${ready.error}` : ""})`],
    ["Journal version", ready.version], ["Active edits", ready.active_edits], ["Model", ready.model],
    ["Fingerprint", ready.fingerprint], ["Targets' sha256", ready.sha256],
    ["Methods", (ready.methods || []).join(", ")], ["Default method", ready.default_method],
  ];
  for (const [method, why] of Object.entries(ready.unavailable_methods || {})) rows.push([`Unavailable: ${method}`, why]);
  // role, head, lag... whatever else the service reports (replicas add these)
  for (const [k, v] of Object.entries(ready)) if (!KNOWN.has(k)) rows.push([k, typeof v === "object" ? JSON.stringify(v) : v]);
  if (recent instanceof Error) rows.push(["Edits in the last hour", recent.message]);
  else {
    const hourAgo = Date.now() - 3600 * 1000;
    const n = recent.edits.filter((e) => Date.parse(e.created_at) >= hourAgo).length;
    rows.push(["Edits in the last hour", n === recent.edits.length && recent.total > n ? `${n}+` : n]);
  }
  if (metricsText instanceof Error) rows.push(["Metrics", metricsText.message]);
  else {
    const m = parseMetrics(metricsText);
    rows.push(["Edits applied since start", total(m, "mend_edits_applied_total")],
      ["Edits rolled back since start", total(m, "mend_edits_rolled_back_total")],
      ["p50 edit latency", ms(histogramQuantile(m, "mend_edit_duration_seconds", 0.5))],
      ["p50 query latency (HTTP)", ms(histogramQuantile(m, "mend_http_request_duration_seconds", 0.5,
        { route: "/query", method: "POST" }))]);
  }
  fill(root, el("dl", { class: "meta", id: "health-list" }, rows.map(([k, v]) =>
    [el("dt", {}, k), el("dd", {}, v === undefined || v === null ? "" : String(v))])));
}

async function readiness() {
  try {
    return await api("health/ready");
  } catch (err) {
    return err.body && typeof err.body === "object" ? err.body : { status: err.message };
  }
}
