// The console's entry point: the API key, the role, tabs (hash routes) and the live journal feed.

import { api, can, probeRole, session } from "./api.js";
import * as ask from "./ask.js";
import { $, fill } from "./dom.js";
import * as editPage from "./edit.js";
import { followJournal } from "./events.js";
import * as health from "./health.js";
import * as journal from "./journal.js";

const views = { journal, edit: editPage, ask, health };
let feed = null;
let retryTimer = null;

/** Shared with the views. */
export const ctx = {
  methods: [],
  defaultMethod: null,
  banner(message) { fill($("#banner-text"), message); $("#banner").hidden = false; },
  clearBanner() { $("#banner").hidden = true; },
  current: null,  // {name, arg} of the view shown
};

function route() {
  const hash = decodeURIComponent(location.hash.replace(/^#/, "")) || "journal";
  const [name, ...rest] = hash.split("/");
  const view = views[name] ? name : "journal";
  ctx.current = { name: view, arg: rest.join("/") };
  for (const v of Object.keys(views)) $(`#view-${v}`).hidden = v !== view;
  for (const a of document.querySelectorAll("#tabs a")) {
    a.classList.toggle("current", a.dataset.view === view || (view === "edit" && a.dataset.view === "journal"));
  }
  views[view].show(ctx, ctx.current.arg).catch((err) => ctx.banner(err.message));
}

function showLogin(message) {
  $("#app").hidden = true;
  $("#tabs").hidden = true;
  $("#session").hidden = true;
  $("#login").hidden = false;
  $("#login-error").hidden = !message;
  fill($("#login-error"), message || "");
  $("#login-key").focus();
}

async function loadServiceInfo() {
  try {
    const ready = await api("health/ready");
    ctx.methods = ready.methods || [];
    ctx.defaultMethod = ready.default_method || ctx.methods[0] || null;
  } catch {
    ctx.methods = [];
  }
}

/** Find the key's role; show the app, or the login form with the reason. */
async function signIn() {
  clearTimeout(retryTimer);
  try {
    session.role = await probeRole();
    session.authOff = !session.key;
  } catch (err) {
    session.role = null;
    if (err.status === 401) {
      const hadKey = Boolean(session.key);
      session.key = "";
      showLogin(hadKey ? err.message : "");
      return;
    }
    showLogin(`${err.message} Retrying in 3 s.`);
    retryTimer = setTimeout(signIn, 3000);
    return;
  }
  await loadServiceInfo();
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#tabs").hidden = false;
  $("#session").hidden = false;
  $("#sign-out").hidden = session.authOff;
  fill($("#who"), session.authOff ? "auth is off on this service (full access)" : `role: ${session.role}`);
  document.body.dataset.role = session.role;
  for (const node of document.querySelectorAll("[data-min-role]")) node.hidden = !can(node.dataset.minRole);
  for (const v of Object.values(views)) v.init?.(ctx);
  startFeed();
  route();
}

function startFeed() {
  feed?.stop();
  const live = $("#live");
  feed = followJournal({
    onState(state, detail) {
      live.className = `live ${state === "live" ? "on" : "off"}`;
      fill(live, state === "live" ? "live" : state);
      live.title = detail || "live journal updates (GET /events)";
    },
    onHead(head) { for (const v of Object.values(views)) v.onHead?.(ctx, head); },
    onOp(op) { for (const v of Object.values(views)) v.onOp?.(ctx, op); },
  });
}

function signOut() {
  feed?.stop();
  feed = null;
  session.key = "";
  session.role = null;
  showLogin("");
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    session.key = $("#login-key").value.trim();
    $("#login-key").value = "";
    signIn();
  });
  $("#sign-out").addEventListener("click", signOut);
  $("#banner-close").addEventListener("click", () => ctx.clearBanner());
  window.addEventListener("hashchange", () => { if (session.role) { ctx.clearBanner(); route(); } });
  signIn();
});
