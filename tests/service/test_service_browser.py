"""The /label page in a real browser: Debian's chromium driven by Playwright, two labellers at once."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from urllib.parse import urlencode

import httpx

from icdistill.data.stream import load_dataset
from service_helpers import KEY, b64, running_service

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# the README's screenshot is refreshed only on request (ICD_UPDATE_SCREENSHOT=1), not by every test run
README_SCREENSHOT = Path(__file__).parents[2] / "docs" / "label_page.png"


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return b64(buf.getvalue())


def test_two_labellers_label_the_queue_in_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    ds = load_dataset("fashion-mnist", split="test")
    items = [ds.item(i) for i in range(5)]
    with running_service(tmp_path, human=True, gate="always") as (c, _):
        url = str(c.base_url)
        queued = []
        for q in items:
            body = {"image_b64": png_b64(q.image), "prompt": q.prompt, "options": list(q.options)}
            r = c.post("/v1/predict", json=body).json()
            assert r["state"] == "pending_human"
            queued.append((r["query_id"], q.label))
        truth = dict(queued)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                pages = []
                for _ in range(2):
                    page = browser.new_context(viewport={"width": 900, "height": 560}).new_page()
                    page.goto(url + "/label")
                    assert page.url.endswith("/login")  # not logged in: sent to the login form
                    page.fill("input[name=key]", "wrong key")
                    page.click("button[type=submit]")
                    assert "Wrong key" in page.content()
                    page.fill("input[name=key]", KEY)
                    page.click("button[type=submit]")
                    page.wait_for_url(re.compile(r".*/label$"))
                    pages.append(page)
                page_a, page_b = pages

                def current(page) -> str:
                    action = page.locator("form").first.get_attribute("action")
                    return action.rsplit("/", 1)[1]

                page_a.reload()
                a, b = current(page_a), current(page_b)
                assert a != b  # two labellers never hold the same item
                assert page_a.locator("img.q").count() == 1
                assert "Student's guess" in page_a.content()
                shot = (
                    README_SCREENSHOT if os.environ.get("ICD_UPDATE_SCREENSHOT") else tmp_path / "label.png"
                )
                page_a.screenshot(path=str(shot))
                assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

                # B skips its item; A labels its own, then keeps going until the queue is empty
                page_b.click("button.skip")
                page_b.wait_for_load_state("load")
                assert current(page_b) not in (b, a)
                labelled = []
                for _ in range(len(items)):
                    if page_a.locator("img.q").count() == 0:
                        break
                    qid = current(page_a)
                    page_a.click(f"button[name=label][value='{truth[qid]}']")
                    page_a.wait_for_load_state("load")
                    labelled.append(qid)
                    if page_a.locator("img.q").count():
                        assert current(page_a) != qid  # the next item appears
                assert "Saved" in page_a.content()
                # B's held item is not given to A while B's lease runs; B labels it
                remaining = set(truth) - set(labelled)
                assert remaining == {current(page_b)}
                qid_b = current(page_b)
                page_b.click(f"button[name=label][value='{truth[qid_b]}']")
                # the form post navigates: read the page once the new one has loaded
                page_b.wait_for_selector("text=Nothing to label", timeout=20_000)
                page_a.goto(url + "/label")
                page_a.wait_for_selector("text=Nothing to label", timeout=20_000)
                cookies = page_a.context.cookies()
                # the OpenAPI page renders from local assets (chromium runs without network access to CDNs)
                page_a.goto(url + "/docs")
                page_a.wait_for_selector(".opblock", timeout=20_000)
                assert page_a.locator(".opblock").count() >= 8
                assert "/v1/predict" in page_a.content()
            finally:
                browser.close()

        # every label is in the pool, as the person gave it
        demos = c.get("/v1/demos").json()["demos"]
        assert {d["query_id"]: d["label"] for d in demos} == truth
        assert all(d["teacher"].startswith("human:") for d in demos)
        s = c.get("/v1/stats").json()
        assert s["pending_human"] == 0 and s["pool_size"] == len(items) and s["budget"]["paid"] == len(items)

        # a forged form (valid session cookie, no CSRF token) is refused and changes nothing
        session = {ck["name"]: ck["value"] for ck in cookies}
        extra = c.post(
            "/v1/predict",
            json={"image_b64": png_b64(items[0].image), "prompt": "other?", "options": ["a", "b"]},
        )
        qid = extra.json()["query_id"]
        forged = httpx.post(f"{url}/label/{qid}", data={"label": "a"}, cookies=session)
        assert forged.status_code == 403
        wrong = httpx.post(f"{url}/label/{qid}", data={"label": "a", "csrf": "0" * 64}, cookies=session)
        assert wrong.status_code == 403
        assert c.get(f"/v1/queries/{qid}").json()["state"] == "pending_human"
        # no cookie at all: the label page asks for a login
        anon = httpx.get(f"{url}/label")
        assert anon.status_code == 303 and anon.headers["location"] == "/login"


ATTACK_PAGE = """<!doctype html><html><body><script>
(async () => {
  const zip = Uint8Array.from(atob("%(zip)s"), c => c.charCodeAt(0));
  const img = Uint8Array.from(atob("%(png)s"), c => c.charCodeAt(0));
  const results = [];
  try {
    await fetch("%(url)s/v1/import", {method: "POST", mode: "no-cors",
      headers: {"Content-Type": "text/plain"}, body: zip});
    results.push("import sent");
  } catch (e) { results.push("import failed " + e); }
  const form = new FormData();
  form.append("image", new Blob([img], {type: "image/png"}), "x.png");
  form.append("prompt", "colour?");
  try {
    await fetch("%(url)s/v1/predict", {method: "POST", mode: "no-cors", body: form});
    results.push("predict sent");
  } catch (e) { results.push("predict failed " + e); }
  document.title = "done: " + results.join(", ");
})();
</script></body></html>"""


def test_label_page_and_cross_site_pages_in_chromium(tmp_path):
    """Issue 17, items 10, 11, 13 in a real browser: a page of another origin cannot write to a
    --no-auth server; the page shows only messages the server chose; the student's guess does not
    look chosen; an open question's uncertainty has a scale; skipping the last item says so."""
    import zipfile

    from playwright.sync_api import sync_playwright
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    from fakes import LocalServer
    from service_helpers import OPTIONS, colour_png, query_json

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        line = {"prompt": "colour?", "label": "red", "options": OPTIONS, "image": "i.png", "query_id": "evil"}
        z.writestr("demos.jsonl", __import__("json").dumps(line) + "\n")
        z.writestr("i.png", colour_png("red"))
    with running_service(tmp_path, human=True, gate="always", api_key=None, no_auth=True) as (c, _):
        url = str(c.base_url)
        page_html = ATTACK_PAGE % {"zip": b64(buf.getvalue()), "png": b64(colour_png("red")), "url": url}
        attacker = Starlette(routes=[Route("/", lambda request: HTMLResponse(page_html))])
        chosen = c.post("/v1/predict", json=query_json("red")).json()["query_id"]
        open_q = c.post("/v1/predict", json={**query_json("blue"), "options": None, "prompt": "What is it?"})
        assert open_q.json()["state"] == "pending_human"
        with LocalServer(attacker) as evil_url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                page = browser.new_context(viewport={"width": 900, "height": 600}).new_page()
                page.goto(url + "/label")
                page.wait_for_url(re.compile(r".*/label$"))
                # the guess is marked, not drawn as the chosen (filled) button
                guess = page.locator("button.guess")
                assert guess.count() == 1 and "guess" in guess.inner_text()
                fill = guess.evaluate("b => getComputedStyle(b).backgroundColor")
                primary = "rgb(74, 91, 212)"
                assert fill != primary
                # ?error= and ?done= carry codes; attacker text is never printed
                lure = "Your key expired: call Mallory"
                page.goto(url + "/label?" + urlencode({"error": lure, "done": lure, "saved": lure}))
                assert "Mallory" not in page.content() and page.locator(".flash").count() == 0
                page.goto(url + "/label?error=bad_label")
                assert "not saved" in page.locator(".flash").inner_text()
                # label the first item: the page confirms what the server stored
                page.click("button[name=label][value='green']")
                page.wait_for_selector(".flash")
                assert "Saved “green”" in page.locator(".flash").inner_text()
                assert "1 demo" in page.locator(".flash").inner_text()
                assert "pool: 1 demo " in page.locator("header").inner_text() + " "
                # the open question: its uncertainty has a scale; skipping the only item says so
                assert page.locator("input[name=label]").count() == 1
                assert "0 is sure" in page.content()
                page.click("button.skip")
                page.wait_for_selector(".flash")
                assert "only item left" in page.locator(".flash").inner_text()
                # a page of another origin tries to write through the browser
                evil = browser.new_context().new_page()
                evil.goto(evil_url + "/")
                evil.wait_for_function("document.title.startsWith('done')", timeout=30_000)
            finally:
                browser.close()
        s = c.get("/v1/stats").json()
        assert s["pool_size"] == 1 and s["queries"] == 2  # nothing the attacker sent got in
        assert c.get(f"/v1/queries/{chosen}").json()["answer"] == "green"
