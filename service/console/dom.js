// DOM helpers. Every piece of text goes in as a text node, never parsed as markup: prompts are user text.

/** el("td", {class: "x"}, "text", child) -> element; attribute values and children are never parsed as HTML. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

/** Append children (nodes, or anything else as text); null / false are skipped. */
export function append(node, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Replace an element's content. */
export function fill(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

export const $ = (selector, root = document) => root.querySelector(selector);

/** A link to an edit's page. */
export function editLink(editId, text) {
  return el("a", { href: `#edit/${encodeURIComponent(editId)}`, class: "edit-link" }, text ?? shortId(editId));
}

export const shortId = (id) => String(id).slice(0, 8);

/** "2025-01-02T03:04:05.678Z" -> "2025-01-02 03:04:05". */
export const when = (iso) => (iso ? String(iso).slice(0, 19).replace("T", " ") : "");

export const prob = (p) => (typeof p === "number" ? p.toFixed(3) : "?");

export function bytes(n) {
  if (typeof n !== "number") return "?";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

/** A status badge: active / rolled back. */
export function statusBadge(status) {
  const rolled = status === "rolled_back";
  return el("span", { class: `badge ${rolled ? "rolled" : "active"}` }, rolled ? "rolled back" : status);
}

/** One request as "[subject] prompt -> target". */
export function factLine(req) {
  return el("div", { class: "fact" },
    req.subject ? el("span", { class: "subject" }, req.subject) : null,
    el("span", { class: "prompt" }, req.prompt),
    el("span", { class: "arrow" }, " \u2192 "),
    el("span", { class: "target" }, req.target));
}
