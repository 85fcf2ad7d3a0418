"""The /label page in a real browser: Debian's chromium driven by Playwright, two labellers at once."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

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
README_SCREENSHOT = Path(__file__).parent.parent / "docs" / "label_page.png"


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
