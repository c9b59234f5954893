// An edit's page: requests and results, delta size and touched layers, dependents, roll back (admin).

import { api, can, listEdits } from "./api.js";
import { prefill } from "./ask.js";
import { $, append, bytes, editLink, el, factLine, fill, prob, statusBadge, when } from "./dom.js";

let shownId = null;
let lastRollback = null;  // {edit_id, response}: shown again when the live feed re-renders the page

export async function show(ctx, editId) {
  shownId = editId;
  const root = $("#view-edit");
  fill(root, el("p", { class: "hint" }, "Loading\u2026"));
  let rec;
  try {
    rec = await api(`edits/${encodeURIComponent(editId)}`);
  } catch (err) {
    fill(root, el("p", { class: "error", role: "alert" }, err.message), el("a", { href: "#journal" }, "Back to the journal"));
    return;
  }
  const later = rec.status === "active"
    ? (await listEdits({ status: "active", after_version: rec.version, order: "asc", limit: 200 })).edits
    : [];
  if (shownId !== editId) return;  // navigated away meanwhile
  render(ctx, root, rec, later);
}

export function onOp(ctx, op) {
  if (ctx.current?.name === "edit" && shownId && (op.op === "rollback" || op.op === "edit")) {
    show(ctx, shownId).catch((err) => ctx.banner(err.message));
  }
}

function render(ctx, root, rec, later) {
  const results = rec.results || [];
  const ranks = Object.entries(rec.rank || {});
  const layers = [...new Set(ranks.map(([name]) => (name.match(/\.(\d+)\./) || [])[1]).filter(Boolean))];
  fill(root,
    el("p", {}, el("a", { href: "#journal" }, "\u2190 Journal")),
    el("h2", {}, `Edit ${rec.edit_id} `, statusBadge(rec.status)),
    el("dl", { class: "meta" },
      meta("Version", rec.version), meta("Method", rec.method), meta("Author", rec.author),
      meta("Created (UTC)", when(rec.created_at)), meta("Latency", `${Math.round(rec.latency_ms || 0)} ms`),
      meta("Delta size", `${bytes(rec.delta_bytes)} (sha256 ${String(rec.delta_sha256 || "").slice(0, 16)}\u2026)`),
      meta("Targets' sha256 after", String(rec.sha256 || "").slice(0, 16) + "\u2026"),
      rec.idempotency_key ? meta("Idempotency key", rec.idempotency_key) : null,
      rec.canary ? meta("Canary check", JSON.stringify(rec.canary)) : null),
    el("h3", {}, "Requests and results"),
    el("table", { class: "results" },
      el("thead", {}, el("tr", {}, el("th", {}, "Fact"), el("th", {}, "Rephrases"), el("th", {}, "p before"),
        el("th", {}, "p after"), el("th", {}, "Success"))),
      el("tbody", {}, (rec.requests || []).map((req, i) => {
        const r = results[i] || {};
        return el("tr", {}, el("td", {}, factLine(req)),
          el("td", {}, (req.rephrases || []).map((p) => el("div", {}, p))),
          el("td", {}, prob(r.p_target_before)), el("td", {}, prob(r.p_target_after)),
          el("td", { class: r.success ? "ok" : "fail" }, r.success ? "yes" : "no"));
      }))),
    el("h3", {}, `Touched weights (${ranks.length}; layers ${layers.join(", ") || "?"})`),
    el("table", { class: "ranks" }, el("tbody", {}, ranks.map(([name, rank]) =>
      el("tr", {}, el("td", { class: "mono" }, name), el("td", {}, `rank ${rank}`))))),
    dependentsBlock(rec, later),
    el("p", {}, el("button", { type: "button", id: "ask-about", onclick: () => askAbout(rec) },
      "Ask the model about this edit")),
    rollbackBlock(ctx, rec, later));
}

const meta = (label, value) => [el("dt", {}, label), el("dd", {}, value)];

function dependentsBlock(rec, later) {
  if (rec.status === "rolled_back") {
    const rb = rec.rolled_back || {};
    const deps = rb.dependents || [];
    return el("div", {}, el("h3", {}, "Rolled back"),
      el("p", {}, `At version ${rb.version} (${when(rb.at)} UTC) by ${rb.by}. `,
        deps.length ? append(el("span"), "Edits computed on top of it, left applied: ", deps.map((d) => [editLink(d), " "]))
                    : "No later active edits were computed on top of it."));
  }
  return el("div", {}, el("h3", {}, "Edits computed on top of it"),
    later.length
      ? el("ul", { id: "dependents" }, later.map((e) => el("li", {}, editLink(e.edit_id, `v${e.version}`), " ",
          (e.requests || []).map(factLine))))
      : el("p", { class: "hint" }, "None: no active edit was made after this one."));
}

function rollbackResult(res) {
  return [el("p", { class: "ok", id: "rollback-result" }, `Rolled back at version ${res.version}.`),
    res.note ? el("p", { class: "note" }, res.note) : null];
}

function rollbackBlock(ctx, rec, later) {
  if (lastRollback?.edit_id === rec.edit_id) return el("div", { class: "rollback" }, rollbackResult(lastRollback.response));
  if (!can("admin") || rec.status !== "active") return null;
  const box = el("div", { class: "rollback" });
  const first = (rec.requests || [])[0] || {};
  const start = el("button", { type: "button", id: "rollback", class: "danger" }, "Roll back\u2026");
  start.addEventListener("click", () => {
    fill(box, el("div", { class: "confirm", role: "dialog", "aria-label": "confirm roll back" },
      el("p", {}, `Roll back edit ${rec.edit_id} (version ${rec.version}: "${first.prompt}" \u2192 "${first.target}")?`),
      later.length ? el("p", {}, `${later.length} later active edit(s) were computed on top of it; they stay applied.`) : null,
      el("button", { type: "button", id: "rollback-confirm", class: "danger", onclick: () => doRollback(ctx, rec, box) },
        `Roll back ${rec.edit_id.slice(0, 8)}`),
      " ",
      el("button", { type: "button", id: "rollback-cancel", onclick: () => fill(box, start) }, "Cancel")));
  });
  return append(box, start);
}

async function doRollback(ctx, rec, box) {
  try {
    const res = await api("rollback", { method: "POST", body: { edit_id: rec.edit_id } });
    lastRollback = { edit_id: rec.edit_id, response: res };
    // The live feed may have re-rendered the page (rollback op) before this response arrived,
    // leaving `box` detached: render again so the result shows from lastRollback.
    if (box.isConnected) fill(box, rollbackResult(res));
    else if (shownId === rec.edit_id) await show(ctx, rec.edit_id);
  } catch (err) {
    fill(box, el("p", { class: "error", role: "alert" }, err.message));
  }
}

function askAbout(rec) {
  const prompts = (rec.requests || []).flatMap((r) => [r.prompt, ...(r.rephrases || [])]);
  const candidates = (rec.requests || []).map((r) => r.target);
  prefill(prompts, candidates, `from edit ${rec.edit_id.slice(0, 8)}`);
  location.hash = "#ask";
}
