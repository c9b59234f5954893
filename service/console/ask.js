// Ask the model: prompts and candidates -> completions and candidate log-probs, with the version
// that answered. A subject fills the prompts from that subject's edits in the journal.

import { api, listEdits } from "./api.js";
import { $, el, fill } from "./dom.js";

const MAX_PROMPTS = 8;
let wired = false;

export function init(ctx) {
  if (wired) return;
  wired = true;
  $("#ask-fill").addEventListener("submit", (ev) => { ev.preventDefault(); fillFromJournal(ctx, ev.target); });
  $("#ask-form").addEventListener("submit", (ev) => { ev.preventDefault(); askModel(ev.target); });
}

export async function show() {}

/** Put prompts and candidates in the form (from an edit's page). */
export function prefill(prompts, candidates, source) {
  const form = $("#ask-form");
  form.elements.prompts.value = unique(prompts).slice(0, MAX_PROMPTS).join("\n");
  form.elements.candidates.value = unique(candidates).join("\n");
  fill($("#ask-fill-note"), source ? `Filled ${source}.` : "");
}

const unique = (items) => [...new Set(items.map((s) => String(s).trim()).filter(Boolean))];

async function fillFromJournal(ctx, form) {
  const subject = form.elements.subject.value.trim();
  if (!subject) return;
  const note = $("#ask-fill-note");
  try {
    const page = await listEdits({ q: subject, limit: 50 });
    const low = subject.toLowerCase();
    const reqs = page.edits.flatMap((e) => e.requests || []).filter((r) =>
      (r.subject || "").toLowerCase() === low || r.prompt.toLowerCase().includes(low));
    if (!reqs.length) {
      prefill([`${subject} is`], [], "");
      fill(note, `No edit about "${subject}" in the journal; asking a plain prompt instead.`);
      return;
    }
    // the edits' new targets and, for contrast, nothing else: the completions show the old answers
    prefill(reqs.flatMap((r) => [r.prompt, ...(r.rephrases || [])]), reqs.map((r) => r.target),
            `from ${page.total} edit(s) matching "${subject}"`);
  } catch (err) {
    fill(note, el("span", { class: "error" }, err.message));
  }
}

async function askModel(form) {
  const lines = (text) => text.split("\n").map((s) => s.trim()).filter(Boolean);
  const prompts = lines(form.elements.prompts.value);
  const candidates = lines(form.elements.candidates.value);
  const body = { prompts, max_new_tokens: Number(form.elements.max_new_tokens.value) || 8 };
  if (candidates.length) body.candidates = candidates;
  const out = $("#ask-result");
  fill(out, el("p", { class: "hint" }, "Asking\u2026"));
  try {
    const res = await api("query", { method: "POST", body });
    fill(out,
      el("p", { id: "ask-version" }, `Answered at journal version ${res.version}.`),
      el("table", { class: "answers" },
        el("thead", {}, el("tr", {}, el("th", {}, "Prompt"), el("th", {}, "Completion"),
          candidates.length ? el("th", {}, "Candidates (mean token log-prob)") : null)),
        el("tbody", {}, res.results.map((r) => el("tr", {},
          el("td", {}, r.prompt), el("td", { class: "completion" }, r.completion),
          r.candidates ? el("td", {}, candidateList(r.candidates)) : null)))));
  } catch (err) {
    fill(out, el("p", { class: "error", role: "alert" }, err.message));
  }
}

function candidateList(scores) {
  const entries = Object.entries(scores).sort((a, b) => b[1] - a[1]);
  return entries.map(([cand, lp], i) => el("div", { class: i === 0 ? "best" : "" }, `${cand}: ${lp.toFixed(3)}`));
}
