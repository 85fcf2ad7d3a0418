"""The /label page: a person labels the queries the student is unsure about.

Server-rendered HTML forms, no script and no external asset (a strict CSP says so). Login with the
API key sets a signed HttpOnly SameSite=Strict cookie (Secure over https, expiring on the server's
clock, ended by Log out); every form carries a CSRF token bound to it. The page prints only messages
the server chose: the address carries codes (``?error=bad_label``, ``?saved=<query id>``), never text.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from icdistill.errors import ServiceError
from icdistill.service.auth import COOKIE, Auth, client_of
from icdistill.service.engine import Engine

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

_STYLE = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;flex-wrap:wrap;gap:4px 16px;
justify-content:space-between;align-items:center}
header b{font-size:18px} main{max-width:760px;margin:24px auto;background:#fff;border-radius:10px;padding:24px;
box-shadow:0 1px 4px rgba(0,0,0,.12)} .row{display:flex;gap:24px;align-items:flex-start} .row>div{flex:1;min-width:0}
img.q{width:256px;height:256px;flex:none;object-fit:contain;image-rendering:pixelated;border:1px solid #ccd;
border-radius:6px;background:#000}
.prompt{font-size:18px;margin:0 0 10px;white-space:pre-wrap;max-height:35vh;overflow-y:auto} .meta{color:#555;font-size:14px;margin:4px 0}
.prompt,.meta,.flash,button{overflow-wrap:anywhere;word-break:break-word}
.opts{display:flex;flex-wrap:wrap;gap:8px;margin:16px 0;max-height:45vh;overflow-y:auto;padding:2px}
button{font-size:15px;padding:8px 14px;border-radius:6px;max-width:100%;white-space:normal;text-align:left;
border:1px solid #4a5bd4;background:#eef0ff;color:#1d2a99;cursor:pointer} button.primary{background:#4a5bd4;color:#fff}
button.guess{border:2px dashed #e0883a} .tag{font-size:11px;color:#a0521a;margin-left:6px}
button.skip{border-color:#999;background:#fafafa;color:#444}
.skipbar{position:sticky;bottom:0;background:#fff;padding:8px 0;margin:0}
input[type=text],input[type=password]{font-size:15px;padding:8px;border:1px solid #aab;border-radius:6px;
width:100%;max-width:420px} .flash{background:#e8f6ea;border:1px solid #9c9;
padding:8px 12px;border-radius:6px;margin-bottom:16px} .err{background:#fdecec;border-color:#d99}
.bar{height:8px;background:#e3e5ef;border-radius:4px;overflow:hidden;width:200px;max-width:40%;display:inline-block;
vertical-align:middle}
.bar i{display:block;height:100%;background:#e0883a}
@media (max-width:640px){main{margin:0;border-radius:0;padding:14px}.row{flex-direction:column;gap:12px}
img.q{width:100%;max-width:200px;height:auto;aspect-ratio:1}header{padding:8px 14px}}
"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    doc = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )
    return HTMLResponse(
        doc,
        status_code=status,
        headers={"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "Cache-Control": "no-store"},
    )


# the only messages the page shows: chosen by code, never text from the address (?error=<code>)
ERRORS = {
    "no_label": "Choose or type a label.",
    "bad_label": "That label was not saved: pick one of the options (an open question takes 1 to 500 characters).",
    "conflict": "That query is no longer waiting for a label (someone else labelled it).",
    "not_found": "That query does not exist.",
}


def plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _header(stats: dict[str, Any]) -> str:
    return (
        "<header><b>icd &middot; label</b><span>"
        f"{stats['pending_human']} waiting &middot; pool: {plural(stats['pool_size'], 'demo', 'demos')} &middot; "
        f"{plural(stats['queries'], 'query', 'queries')}</span></header>"
    )


LOGOUT = (
    "<footer style='max-width:760px;margin:0 auto;padding:0 14px;text-align:right'><form method=post action='/logout'>"
    "<button type=submit class=logout>Log out</button></form></footer>"
)


def label_router(engine: Engine, auth: Auth) -> APIRouter:
    r = APIRouter(include_in_schema=False)
    e = html.escape

    def login_form(message: str = "", status: int = 200) -> HTMLResponse:
        flash = f"<div class='flash err'>{e(message)}</div>" if message else ""
        return _page(
            "icd label: log in",
            "<header><b>icd &middot; label</b></header><main>"
            f"{flash}<h2>Log in to label</h2><form method=post action='/login'>"
            "<p><input type=password name=key placeholder='API key' autofocus required></p>"
            "<p><button type=submit class=primary>Log in</button></p></form></main>",
            status,
        )

    def session_or_login(request: Request) -> str | Response:
        sid = auth.session(request)
        return RedirectResponse("/login", status_code=303) if sid is None else sid

    def logged_in(request: Request) -> Response:
        resp = RedirectResponse("/label", status_code=303)
        auth.set_session(resp, request)
        return resp

    @r.get("/login")
    async def login_page(request: Request) -> Response:
        return logged_in(request) if auth.api_key is None else login_form()

    @r.post("/login")
    async def login(request: Request) -> Response:
        try:
            auth.check_throttle(request)
        except ServiceError as err:
            resp = login_form("Too many wrong keys from this address: wait a minute and try again.", 429)
            resp.headers.update(err.headers or {})
            return resp
        form = await request.form(max_fields=4, max_files=0)
        key = form.get("key")
        # trimmed as the Bearer header's key is: a pasted key often brings a space or a newline
        if not isinstance(key, str) or not auth.key_ok(key.strip()):
            auth.throttle.failed(client_of(request))
            return login_form("Wrong key.", 401)
        return logged_in(request)

    @r.post("/logout")
    async def logout(request: Request) -> Response:
        ended = auth.end_session(request)
        if ended is not None:
            await engine.end_session(*ended)  # written down before the browser is told
        resp = RedirectResponse("/login" if auth.api_key else "/label", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    async def flash_for(request: Request, item: dict[str, Any] | None) -> str:
        """The one message the page shows, chosen by the server from codes in the address."""
        p = request.query_params
        if p.get("error") in ERRORS:
            return f"<div class='flash err'>{e(ERRORS[p['error']])}</div>"
        if item is not None and p.get("skipped") == item["query_id"]:
            return "<div class=flash>This is the only item left: skipping it brings it back.</div>"
        saved = p.get("saved")
        if saved:
            label = await engine.saved_label(saved)
            if label is not None:
                size = plural(engine.stats()["pool_size"], "demo", "demos")
                return f"<div class=flash>Saved &ldquo;{e(label)}&rdquo;. The pool now has {size}.</div>"
        return ""

    @r.get("/label")
    async def label_page(request: Request) -> Response:
        sid = session_or_login(request)
        if not isinstance(sid, str):
            return sid
        await engine.start()
        stats = engine.stats()
        if not engine.cfg.human_teacher:
            flash = await flash_for(request, None)
            body = f"<main>{flash}<h2>This service's teacher is a model</h2><p>Nothing to label.</p></main>"
            return _page("icd label", _header(stats) + body + LOGOUT)
        item = await engine.next_label_item(sid)
        flash = await flash_for(request, item)
        if item is None:
            body = (
                f"<main>{flash}<h2>Nothing to label</h2><p>No query is waiting for a person. "
                "<a href='/label'>Check again</a>.</p></main>"
            )
            return _page("icd label", _header(stats) + body + LOGOUT)
        form = _item_form(item, auth.csrf_token(sid), engine.cfg.uncertainty)
        return _page("icd label", _header(stats) + f"<main>{flash}{form}</main>" + LOGOUT)

    @r.post("/label/{query_id}")
    async def submit(request: Request, query_id: str) -> Response:
        sid = auth.session(request)
        if sid is None:
            return login_form("Your session ended; log in again.", 401)
        form = await request.form(max_fields=6, max_files=0)
        token = form.get("csrf")
        if not isinstance(token, str) or not auth.csrf_ok(sid, token):
            return _page("icd label", "<main><h2>Forbidden</h2><p>Bad or missing CSRF token.</p></main>", 403)
        if form.get("action") == "skip":
            await engine.skip_label(query_id, sid)
            return RedirectResponse("/label?" + urlencode({"skipped": query_id}), status_code=303)
        label = form.get("label")
        if not isinstance(label, str):
            return RedirectResponse("/label?error=no_label", status_code=303)
        try:
            await engine.submit_label(query_id, label, sid)
        except ServiceError as err:
            code = err.code if err.code in ERRORS else "bad_label"
            return RedirectResponse("/label?" + urlencode({"error": code}), status_code=303)
        return RedirectResponse("/label?" + urlencode({"saved": query_id}), status_code=303)

    return r


def _uncertainty(u: float | None, measure: str) -> str:
    """A bar on a 0..1 scale; an unbounded value (an open question's entropy) says what it measures."""
    if u is None:
        return ""
    if 0 <= u <= 1:
        pct = int(round(100 * u))
        return (
            f"<p class=meta>Uncertainty {u:.2f} of 1 <span class=bar><i style='width:{pct}%'></i></span></p>"
        )
    return f"<p class=meta>Uncertainty {u:.2f} ({html.escape(measure)}: 0 is sure, higher is less sure)</p>"


def _item_form(item: dict[str, Any], csrf: str, measure: str) -> str:
    e = html.escape
    qid = e(item["query_id"])
    unsure = _uncertainty(item["uncertainty"], measure)
    guess = item["answer"]
    img = (
        f"<img class=q alt='query image' src='data:image/png;base64,{item['image_b64']}'>"
        if item.get("image_b64")
        else "<div class=q>(no image)</div>"
    )
    hidden = f"<input type=hidden name=csrf value='{e(csrf)}'>"
    if item["options_list"]:
        buttons = "".join(
            f"<button type=submit name=label value='{e(o)}' class='{'guess' if o == guess else ''}'>{e(o)}"
            f"{'<span class=tag>guess</span>' if o == guess else ''}</button>"
            for o in item["options_list"]
        )
        answer = f"<div class=opts>{buttons}</div>"
    else:
        answer = (
            f"<p><input type=text name=label value='{e(guess)}' required maxlength=500 autofocus> "
            "<button type=submit class=primary>Save</button></p>"
        )
    return (
        f"<div class=row>{img}<div>"
        f"<p class=prompt>{e(item['prompt'])}</p>"
        f"<p class=meta>Student's guess: <b>{e(guess)}</b></p>{unsure}"
        f"<p class=meta>Query {qid[:8]} &middot; #{item['position']}</p>"
        f"<form method=post action='/label/{qid}'>{hidden}{answer}</form>"
        # Skip stays on screen however long the page (sticky), and the options scroll in their own box
        f"<form method=post action='/label/{qid}' class=skipbar>{hidden}"
        "<button type=submit name=action value=skip class=skip>Skip</button></form>"
        "</div></div>"
    )
