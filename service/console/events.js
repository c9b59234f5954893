// Follows GET /events (server-sent events) with fetch(), so that the API key travels in the
// Authorization header: EventSource cannot send headers, and a key in the URL ends up in logs.

import { authHeaders } from "./api.js";

/** Parse complete SSE frames out of `buffer`; returns [events, rest]. */
export function parseFrames(buffer) {
  const events = [];
  const text = buffer.replace(/\r\n?/g, "\n");
  let start = 0;
  let end;
  while ((end = text.indexOf("\n\n", start)) >= 0) {
    const frame = { event: "message", data: [], id: null };
    for (const line of text.slice(start, end).split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") frame.event = value;
      else if (field === "data") frame.data.push(value);
      else if (field === "id") frame.id = value;
    }
    if (frame.data.length) events.push({ ...frame, data: frame.data.join("\n") });
    start = end + 2;
  }
  return [events, text.slice(start)];
}

/**
 * Follow the journal until `stop()`: onHead({version, after}) on each (re)connection, onOp(op) per op,
 * onState("live" | "reconnecting" | "denied" | "stopped", detail). Reconnects after each stream ends,
 * resuming after the last version seen; backs off while the service is unreachable.
 */
export function followJournal({ onOp, onHead, onState }) {
  const abort = new AbortController();
  let after = null;
  let stopped = false;

  async function readOnce() {
    const path = after === null ? "events" : `events?after=${after}`;
    const resp = await fetch(path, { headers: authHeaders({ Accept: "text/event-stream" }),
                                     cache: "no-store", signal: abort.signal });
    if (resp.status === 401 || resp.status === 403) {
      const err = new Error(`GET /events answered ${resp.status}`);
      err.status = resp.status;
      throw err;
    }
    if (!resp.ok || !resp.body) throw new Error(`GET /events answered ${resp.status}`);
    onState("live");
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      let events;
      [events, buffer] = parseFrames(buffer + value);
      for (const ev of events) {
        const data = JSON.parse(ev.data);
        if (ev.event === "head") {
          after = data.after;
          onHead(data);
        } else if (ev.event === "op") {
          after = Number(ev.id);
          onOp(data);
        }
      }
    }
  }

  (async () => {
    let delay = 1000;
    while (!stopped) {
      try {
        await readOnce();
        delay = 1000;  // a stream that ended normally: reconnect at once
      } catch (err) {
        if (stopped) break;
        if (err.status === 401 || err.status === 403) { onState("denied", err.message); return; }
        onState("reconnecting", err.message);
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 2, 15000);
      }
    }
    onState("stopped");
  })();

  return { stop() { stopped = true; abort.abort(); } };
}
