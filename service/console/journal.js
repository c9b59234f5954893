// Journal view: edits newest first, filters, paging, live refresh, and the new-edit form (editor+).

import { api, can, listEdits } from "./api.js";
import { $, append, editLink, el, factLine, fill, prob, statusBadge, when } from "./dom.js";

const PAGE = 20;
const state = { offset: 0, filters: {}, seen: new Set(), pendingOps: 0, version: null, seq: 0 };
let wired = false;

export function init(ctx) {
  const methodFilter = $("#filters select[name=method]");
  const editMethod = $("#edit-form select[name=method]");
  fill(methodFilter, el("option", { value: "" }, "any"), ctx.methods.map((m) => el("option", { value: m }, m)));
  fill(editMethod, ctx.methods.map((m) => el("option", { value: m, selected: m === ctx.defaultMethod }, m)));
  if (wired) return;
  wired = true;
  const form = $("#filters");
  let debounce = null;
  const apply = () => {
    state.filters = Object.fromEntries(new FormData(form).entries());
    state.offset = 0;
    load(ctx).catch((err) => ctx.banner(err.message));
  };
  form.addEventListener("submit", (ev) => { ev.preventDefault(); apply(); });
  form.addEventListener("change", apply);
  form.addEventListener("input", () => { clearTimeout(debounce); debounce = setTimeout(apply, 300); });
  $("#journal-prev").addEventListener("click", () => page(ctx, -PAGE));
  $("#journal-next").addEventListener("click", () => page(ctx, PAGE));
  $("#journal-newest").addEventListener("click", () => page(ctx, -state.offset));
  $("#edit-form").addEventListener("submit", (ev) => { ev.preventDefault(); submitEdit(ctx, ev.target); });
}

function page(ctx, delta) {
  state.offset = Math.max(0, state.offset + delta);
  load(ctx).catch((err) => ctx.banner(err.message));
}

export async function show(ctx) {
  await load(ctx);
}

let reloadTimer = null;

/** Reload soon, once for a burst of ops. */
function reloadSoon(ctx) {
  clearTimeout(reloadTimer);
  reloadTimer = setTimeout(() => load(ctx).catch((err) => ctx.banner(err.message)), 150);
}

/** Another op arrived: refresh the first page in place; elsewhere say that there is news. */
export function onOp(ctx) {
  if (ctx.current?.name !== "journal") return;
  if (state.offset === 0) reloadSoon(ctx);
  else {
    state.pendingOps += 1;
    $("#journal-new").hidden = false;
    fill($("#journal-newest"), `${state.pendingOps} new op(s): show newest`);
  }
}

/** A (re)connected feed: refresh if the journal moved while it was not followed. */
export function onHead(ctx, head) {
  if (ctx.current?.name === "journal" && state.version !== null && head.version !== state.version) reloadSoon(ctx);
}

async function load(ctx) {
  const params = { ...state.filters, offset: state.offset, limit: PAGE };
  const seq = ++state.seq;
  const [pageData, active] = await Promise.all([
    listEdits(params),
    listEdits({ status: "active", order: "desc", limit: 200 }),
  ]);
  if (seq !== state.seq) return;  // a later load (newer filters or ops) renders instead
  state.version = pageData.version;
  state.pendingOps = 0;
  $("#journal-new").hidden = true;
  const activeVersions = active.edits.map((e) => e.version);
  const body = $("#journal-table tbody");
  const firstLoad = state.seen.size === 0;
  fill(body, pageData.edits.map((rec) => row(rec, dependents(rec, activeVersions, active.total), firstLoad)));
  $("#journal-empty").hidden = pageData.edits.length > 0;
  const first = pageData.total ? pageData.offset + 1 : 0;
  const last = pageData.offset + pageData.edits.length;
  fill($("#journal-range"), `${first}\u2013${last} of ${pageData.total} (journal version ${pageData.version})`);
  $("#journal-prev").disabled = state.offset === 0;
  $("#journal-next").disabled = last >= pageData.total;
}

/** Dependents: recorded at rollback; for an active edit, the active edits made after it. */
function dependents(rec, activeVersions, activeTotal) {
  if (rec.status === "rolled_back") return { ids: rec.rolled_back?.dependents || [], label: "at rollback" };
  const later = activeVersions.filter((v) => v > rec.version).length;
  const complete = activeVersions.length === activeTotal || activeVersions.some((v) => v <= rec.version);
  return { count: complete ? later : `${later}+`, label: "later active" };
}

function row(rec, deps, firstLoad) {
  const isNew = !firstLoad && !state.seen.has(rec.edit_id);
  state.seen.add(rec.edit_id);
  const results = rec.results || [];
  const depCell = deps.ids
    ? (deps.ids.length ? append(el("span"), deps.ids.map((id) => [editLink(id), " "]), `(${deps.label})`) : "none")
    : (deps.count === 0 ? "none" : `${deps.count} (${deps.label})`);
  return el("tr", { class: `${rec.status}${isNew ? " new" : ""}`, "data-edit-id": rec.edit_id },
    el("td", {}, editLink(rec.edit_id, `v${rec.version}`)),
    el("td", { title: rec.created_at }, when(rec.created_at)),
    el("td", {}, rec.method),
    el("td", {}, rec.author),
    el("td", { class: "facts" }, (rec.requests || []).map(factLine)),
    el("td", {}, results.map((r) => el("div", {}, `${prob(r.p_target_before)} \u2192 ${prob(r.p_target_after)}`))),
    el("td", {}, results.map((r) => el("div", { class: r.success ? "ok" : "fail" }, r.success ? "yes" : "no"))),
    el("td", { class: "status" }, statusBadge(rec.status)),
    el("td", {}, depCell));
}

async function submitEdit(ctx, form) {
  if (!can("editor")) return;
  const data = Object.fromEntries(new FormData(form).entries());
  const request = { prompt: data.prompt, target: data.target };
  if (data.subject.trim()) request.subject = data.subject;
  const rephrases = data.rephrases.split("\n").map((s) => s.trim()).filter(Boolean);
  if (rephrases.length) request.rephrases = rephrases;
  const out = $("#edit-result");
  fill(out, el("p", { class: "hint" }, "Editing\u2026 (a locate-then-edit method can take many seconds)"));
  const button = form.querySelector("button");
  button.disabled = true;
  try {
    const res = await api("edit", { method: "POST", body: { requests: [request], method: data.method || undefined } });
    fill(out, el("p", {}, "Edit ", editLink(res.edit_id), ` made with ${res.method} at version ${res.version} `,
                  `in ${Math.round(res.latency_ms)} ms: `),
         res.results.map((r) => el("div", { class: r.success ? "ok" : "fail" },
           `${r.success ? "success" : "not yet the greedy answer"}: p(target) ${prob(r.p_target_before)} \u2192 ${prob(r.p_target_after)}`)));
  } catch (err) {
    fill(out, el("p", { class: "error", role: "alert" }, err.message));
  } finally {
    button.disabled = false;
  }
}
