"""The console in a real browser: Debian's chromium driven by Playwright against a real `mend serve`
(uvicorn, embedded redis-server, a tiny model saved as a local directory; edits use ft).

Skipped, with the reason, only where no chromium binary exists (`apt-get install chromium`; CI installs
it). Set MEND_CONSOLE_SCREENSHOTS=DIR to save the screenshots shown in the README.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from mend_harness import fixture_facts, make_tiny_llama  # noqa: E402

from service.redis_embedded import free_port  # noqa: E402

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on this machine (apt-get install chromium); "
                                                "the console's browser tests need it"),
]
REPO = Path(__file__).resolve().parents[2]
FACTS = fixture_facts()
KEYS = {
    "browser-reader-key-0123456789": {"name": "dashboards", "role": "reader"},
    "browser-editor-key-0123456789": {"name": "fact-fixer", "role": "editor"},
    "browser-admin-key-01234567890": {"name": "ops", "role": "admin"},
}
KEY_OF = {info["role"]: key for key, info in KEYS.items()}
XSS_PROMPT = "<img src=x onerror=alert(1)> The capital of <script>alert(2)</script> is"
SHOTS = os.environ.get("MEND_CONSOLE_SCREENSHOTS")


@pytest.fixture(scope="module")
def service(tiny_tokenizer, tmp_path_factory):
    """`mend serve` (python -m service.cli serve) with API keys, on a free port; yields its base URL."""
    import json

    root = tmp_path_factory.mktemp("console-serve")
    model_dir = root / "tiny-llama"
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEND_")}
    env.update(MEND_MODEL=str(model_dir), MEND_PORT=str(port), MEND_HOST="127.0.0.1",
               MEND_DATA_DIR=str(root / "var"), MEND_TORCH_THREADS="1", MEND_LOG_FORMAT="json",
               MEND_EDITORS_DIR=str(root / "no-editors"), MEND_CANARY_GUARD="false",
               MEND_API_KEYS=json.dumps(KEYS), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               MEND_MAX_PAGE_SIZE="50")  # below the console's 200: it must lower its page size itself
    log = root / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"mend serve exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def expect(locator):
    """Playwright's expect (its polling needs no eval, which the console's CSP forbids)."""
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # a dev dependency; only chromium may be missing

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A fresh browser context (own sessionStorage) on /console, recording dialogs and console errors."""

    def __init__(self, browser, base: str):
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.goto(f"{base}/console")

    def sign_in(self, role: str | None, key: str | None = None) -> None:
        self.page.fill("#login-key", key or KEY_OF[role])
        self.page.click("#login-form button")
        if role is not None:
            self.page.wait_for_selector(f"#who:has-text('role: {role}')")
            self.page.wait_for_selector("#live.on")  # the journal feed (GET /events) is connected

    def row(self, edit_id: str):
        return self.page.locator(f"#journal-table tr[data-edit-id='{edit_id}']")

    def shot(self, name: str) -> None:
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(SHOTS) / name), full_page=True)

    def check(self) -> None:
        """No script error and no CSP violation on the page so far."""
        # 4xx answers (the role probe's 403/422, a wrong key's 401) are logged by chromium as failed loads;
        # anything else (a script error, a CSP violation) fails the test
        unexpected = [e for e in self.errors if "the server responded with a status of 4" not in e]
        assert not unexpected, unexpected

    def close(self) -> None:
        self.context.close()


def post_edit(base: str, prompt: str, target: str, subject: str | None = None, role: str = "editor") -> dict:
    req = {"prompt": prompt, "target": target}
    if subject:
        req["subject"] = subject
    r = httpx.post(f"{base}/edit", json={"requests": [req], "method": "ft"},
                   headers={"Authorization": f"Bearer {KEY_OF[role]}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_wrong_key_shows_a_clear_401_message(service, browser):
    p = Page(browser, service)
    try:
        p.page.wait_for_selector("#login-key")
        assert p.page.is_hidden("#app")
        p.sign_in(None, key="not-a-valid-key")
        error = p.page.wait_for_selector("#login-error:visible")
        assert "401" in error.text_content() and "not accepted" in error.text_content()
        assert p.page.is_hidden("#app")
        assert p.page.evaluate("sessionStorage.getItem('mend.apiKey')") is None  # a refused key is not kept
        p.check()
    finally:
        p.close()


def test_live_journal_filter_open_and_roll_back_as_admin(service, browser):
    p = Page(browser, service)
    try:
        p.sign_in("admin")
        assert p.page.evaluate("sessionStorage.getItem('mend.apiKey')") == KEY_OF["admin"]
        assert p.page.evaluate("localStorage.length") == 0
        p.page.evaluate("window.__notReloaded = true")
        norway = post_edit(service, FACTS[7]["prompt"], FACTS[7]["target_new"], subject="Norway")
        p.row(norway["edit_id"]).wait_for()  # appears without a reload, through GET /events
        other = post_edit(service, FACTS[0]["prompt"], FACTS[0]["target_new"])
        p.row(other["edit_id"]).wait_for()
        assert p.page.evaluate("window.__notReloaded") is True
        row = p.row(norway["edit_id"])
        assert "Norway" in row.text_content() and FACTS[7]["target_new"] in row.text_content()
        assert "active" in row.locator("td.status").text_content() and "fact-fixer" in row.text_content()
        p.shot("journal.png")

        p.page.fill("#filters input[name=q]", "norway")
        expect(p.page.locator("#journal-table tbody tr")).to_have_count(1)
        assert p.row(norway["edit_id"]).count() == 1 and p.row(other["edit_id"]).count() == 0
        p.page.fill("#filters input[name=q]", "")
        p.page.select_option("#filters select[name=status]", "rolled_back")
        p.page.wait_for_selector("#journal-empty:visible")
        p.page.select_option("#filters select[name=status]", "")
        p.row(other["edit_id"]).wait_for()

        p.row(norway["edit_id"]).locator("a.edit-link").click()
        p.page.wait_for_selector(f"#view-edit h2:has-text('{norway['edit_id']}')")
        view = p.page.locator("#view-edit")
        assert "Delta size" in view.text_content() and "rank" in view.text_content()
        assert "Touched weights" in view.text_content()
        assert view.locator(f"#dependents a[href='#edit/{other['edit_id']}']").count() == 1
        p.shot("edit.png")
        p.page.click("#rollback")
        confirm = p.page.wait_for_selector("#view-edit .confirm")
        assert norway["edit_id"] in confirm.text_content()  # the confirm step names the edit
        assert "1 later active edit" in confirm.text_content()
        p.page.click("#rollback-cancel")
        p.page.click("#rollback")
        p.page.click("#rollback-confirm")
        result = p.page.wait_for_selector("#rollback-result")
        assert "Rolled back at version" in result.text_content()
        note = p.page.wait_for_selector("#view-edit .note")
        assert "git revert" in note.text_content() and other["edit_id"] in note.text_content()  # as the API said
        p.page.click("#tabs a[data-view=journal]")
        p.row(norway["edit_id"]).locator("td.status:has-text('rolled back')").wait_for()
        assert "active" in p.row(other["edit_id"]).locator("td.status").text_content()
        assert p.page.evaluate("window.__notReloaded") is True
        p.check()
    finally:
        p.close()


def test_reader_sees_no_edit_or_rollback_controls(service, browser):
    edit = post_edit(service, FACTS[1]["prompt"], FACTS[1]["target_new"])
    p = Page(browser, service)
    try:
        p.sign_in("reader")
        p.row(edit["edit_id"]).wait_for()
        assert p.page.is_hidden("#edit-box")
        p.row(edit["edit_id"]).locator("a.edit-link").click()
        p.page.wait_for_selector(f"#view-edit h2:has-text('{edit['edit_id']}')")
        assert p.page.locator("#rollback").count() == 0 and p.page.locator("#rollback-confirm").count() == 0
        p.check()
    finally:
        p.close()


def test_user_text_renders_as_text_never_as_markup(service, browser):
    p = Page(browser, service)
    try:
        p.sign_in("editor")
        assert p.page.is_visible("#edit-box")
        edit = post_edit(service, XSS_PROMPT, "<b>Oslo</b>")
        row = p.row(edit["edit_id"])
        row.wait_for()
        assert XSS_PROMPT in row.text_content() and "<b>Oslo</b>" in row.text_content()
        assert p.page.locator("#journal-table img, #journal-table script, #journal-table b").count() == 0
        row.locator("a.edit-link").click()
        p.page.wait_for_selector(f"#view-edit h2:has-text('{edit['edit_id']}')")
        assert XSS_PROMPT in p.page.locator("#view-edit").text_content()
        assert p.page.locator("#view-edit img, #view-edit script, #view-edit b").count() == 0
        p.page.wait_for_timeout(300)
        assert p.dialogs == []  # nothing ran
        p.check()
    finally:
        p.close()


def test_new_edit_form_ask_the_model_and_health(service, browser):
    p = Page(browser, service)
    try:
        p.sign_in("editor")
        p.page.click("#edit-box summary")
        assert p.page.locator("#edit-form select[name=method] option").all_text_contents() == ["ft"]
        p.page.fill("#edit-form input[name=prompt]", FACTS[3]["prompt"])
        p.page.fill("#edit-form input[name=subject]", "no such subject")
        p.page.fill("#edit-form input[name=target]", FACTS[3]["target_new"])
        p.page.click("#edit-form button")
        error = p.page.wait_for_selector("#edit-result .error")
        assert "422" in error.text_content() and "does not occur in the prompt" in error.text_content()
        p.page.fill("#edit-form input[name=subject]", "")
        p.page.click("#edit-form button")
        made = p.page.wait_for_selector("#edit-result a.edit-link", timeout=120_000)
        assert "made with ft" in p.page.locator("#edit-result").text_content()
        edit_id = made.get_attribute("href").split("/", 1)[1]
        p.row(edit_id).wait_for()

        p.page.click("#tabs a[data-view=ask]")
        p.page.fill("#ask-fill input[name=subject]", "Norway")
        p.page.click("#ask-fill button")
        expect(p.page.locator("#ask-form textarea[name=prompts]")).not_to_have_value("")
        assert FACTS[7]["prompt"] in p.page.input_value("#ask-form textarea[name=prompts]")
        assert FACTS[7]["target_new"] in p.page.input_value("#ask-form textarea[name=candidates]")
        p.page.click("#ask-form button")
        version = p.page.wait_for_selector("#ask-version")
        assert "Answered at journal version" in version.text_content()
        assert p.page.locator("#ask-result tbody tr").count() >= 1
        assert FACTS[7]["target_new"] in p.page.locator("#ask-result").text_content()
        p.shot("ask.png")

        p.page.click("#tabs a[data-view=health]")
        health = p.page.wait_for_selector("#health-list")
        text = health.text_content()
        for label in ("Ready", "Journal version", "Methods", "Edits in the last hour", "p50 edit latency",
                      "p50 query latency"):
            assert label in text, label
        assert "ms" in text and "no data yet" not in text
        p.shot("health.png")
        p.check()
    finally:
        p.close()


def test_metrics_and_event_stream_parsers(service, browser):
    """The page's own parsers, run in the browser: Prometheus histogram p50 and SSE framing."""
    p = Page(browser, service)
    try:
        p.page.wait_for_selector("#login-key")
        out = p.page.evaluate("""async () => {
            const m = await import("./console/static/metrics.js");
            const e = await import("./console/static/events.js");
            const text = [
              '# HELP x', 'h_bucket{route="/query",le="0.1"} 2.0', 'h_bucket{route="/query",le="0.5"} 6.0',
              'h_bucket{route="/query",le="+Inf"} 8.0', 'h_bucket{route="/edit",le="0.1"} 0.0',
              'h_bucket{route="/edit",le="0.5"} 0.0', 'h_bucket{route="/edit",le="+Inf"} 0.0',
              'c_total{method="ft"} 3.0', 'c_total{method="mend"} 2.0'].join("\\n");
            const s = m.parseMetrics(text);
            const [frames, rest] = e.parseFrames(
              "retry: 1000\\r\\n\\r\\nid: 7\\nevent: op\\ndata: {\\"a\\":\\ndata: 1}\\n\\n: keepalive\\n\\nid: 8\\nev");
            return {p50: m.histogramQuantile(s, "h", 0.5, {route: "/query"}),
                    p99: m.histogramQuantile(s, "h", 0.99, {route: "/query"}),
                    empty: m.histogramQuantile(s, "h", 0.5, {route: "/edit"}),
                    total: m.total(s, "c_total"), frames, rest};
        }""")
        assert out["p50"] == pytest.approx(0.1 + 0.4 * (4 - 2) / (6 - 2))  # rank 4 inside (0.1, 0.5]
        assert out["p99"] == pytest.approx(0.5)  # in the +Inf bucket: its lower bound
        assert out["empty"] is None and out["total"] == 5
        assert out["frames"] == [{"event": "op", "id": "7", "data": '{"a":\n1}'}]
        assert out["rest"] == "id: 8\nev"
        p.check()
    finally:
        p.close()
