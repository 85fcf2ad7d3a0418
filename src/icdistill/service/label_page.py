"""The /label page: a person labels the queries the student is unsure about.

Server-rendered HTML forms, no script and no external asset (a strict CSP says so). Login with the
API key sets a signed HttpOnly SameSite=Strict cookie; every form carries a CSRF token bound to it.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from icdistill.service.auth import COOKIE, Auth
from icdistill.service.engine import Engine
from icdistill.service.errors import ServiceError

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;justify-content:space-between;align-items:center}
header b{font-size:18px} main{max-width:760px;margin:24px auto;background:#fff;border-radius:10px;padding:24px;
box-shadow:0 1px 4px rgba(0,0,0,.12)} .row{display:flex;gap:24px;align-items:flex-start}
img.q{width:256px;height:256px;object-fit:contain;image-rendering:pixelated;border:1px solid #ccd;border-radius:6px;background:#000}
.prompt{font-size:18px;margin:0 0 10px} .meta{color:#555;font-size:14px;margin:4px 0}
.opts{display:flex;flex-wrap:wrap;gap:8px;margin:16px 0} button{font-size:15px;padding:8px 14px;border-radius:6px;
border:1px solid #4a5bd4;background:#eef0ff;color:#1d2a99;cursor:pointer} button.guess{background:#4a5bd4;color:#fff}
button.skip{border-color:#999;background:#fafafa;color:#444} input[type=text],input[type=password]{font-size:15px;
padding:8px;border:1px solid #aab;border-radius:6px;width:260px} .flash{background:#e8f6ea;border:1px solid #9c9;
padding:8px 12px;border-radius:6px;margin-bottom:16px} .err{background:#fdecec;border-color:#d99}
.bar{height:8px;background:#e3e5ef;border-radius:4px;overflow:hidden;width:200px;display:inline-block;vertical-align:middle}
.bar i{display:block;height:100%;background:#e0883a}
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


def _header(stats: dict[str, Any]) -> str:
    return (
        "<header><b>icd &middot; label</b><span>"
        f"{stats['pending_human']} waiting &middot; pool {stats['pool_size']} demos &middot; "
        f"{stats['queries']} queries</span></header>"
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
            "<p><button type=submit class=guess>Log in</button></p></form></main>",
            status,
        )

    def session_or_login(request: Request) -> str | Response:
        sid = auth.session(request)
        return RedirectResponse("/login", status_code=303) if sid is None else sid

    @r.get("/login")
    async def login_page() -> Response:
        if auth.api_key is None:
            resp = RedirectResponse("/label", status_code=303)
            _set_cookie(resp, auth.new_session())
            return resp
        return login_form()

    @r.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form(max_fields=4, max_files=0)
        key = form.get("key")
        if not isinstance(key, str) or not auth.key_ok(key):
            return login_form("Wrong key.", 401)
        resp = RedirectResponse("/label", status_code=303)
        _set_cookie(resp, auth.new_session())
        return resp

    @r.get("/label")
    async def label_page(request: Request, done: str = "", error: str = "") -> Response:
        sid = session_or_login(request)
        if not isinstance(sid, str):
            return sid
        await engine.start()
        stats = engine.stats()
        flash = ""
        if done:
            flash = f"<div class=flash>Saved &ldquo;{e(done[:200])}&rdquo;. The pool now has {stats['pool_size']} demos.</div>"
        if error:
            flash = f"<div class='flash err'>{e(error[:300])}</div>"
        if not engine.cfg.human_teacher:
            body = f"<main>{flash}<h2>This service's teacher is a model</h2><p>Nothing to label.</p></main>"
            return _page("icd label", _header(stats) + body)
        item = await engine.next_label_item(sid)
        if item is None:
            body = (
                f"<main>{flash}<h2>Nothing to label</h2><p>No query is waiting for a person. "
                "<a href='/label'>Check again</a>.</p></main>"
            )
            return _page("icd label", _header(stats) + body)
        return _page(
            "icd label", _header(stats) + f"<main>{flash}{_item_form(item, auth.csrf_token(sid))}</main>"
        )

    @r.post("/label/{query_id}")
    async def submit(request: Request, query_id: str) -> Response:
        sid = auth.session(request)
        if sid is None:
            return login_form("Your session ended; log in again.", 401)
        form = await request.form(max_fields=6, max_files=0)
        token = form.get("csrf")
        if not isinstance(token, str) or not auth.csrf_ok(sid, token):
            return _page("icd label", "<main><h2>Forbidden</h2><p>Bad or missing CSRF token.</p></main>", 403)
        action = form.get("action")
        if action == "skip":
            await engine.skip_label(query_id, sid)
            return RedirectResponse("/label", status_code=303)
        label = form.get("label")
        if not isinstance(label, str):
            return RedirectResponse("/label?error=Choose+or+type+a+label.", status_code=303)
        try:
            row = await engine.submit_label(query_id, label, sid)
        except ServiceError as err:
            return RedirectResponse("/label?" + urlencode({"error": err.message}), status_code=303)
        return RedirectResponse("/label?" + urlencode({"done": row["teacher_answer"] or ""}), status_code=303)

    return r


def _set_cookie(resp: Response, value: str) -> None:
    resp.set_cookie(COOKIE, value, httponly=True, samesite="strict", path="/", max_age=7 * 24 * 3600)


def _item_form(item: dict[str, Any], csrf: str) -> str:
    e = html.escape
    qid = e(item["query_id"])
    u = item["uncertainty"]
    pct = int(round(100 * u)) if u is not None and 0 <= u <= 1 else None
    unsure = (
        f"<p class=meta>Uncertainty {u:.2f} <span class=bar><i style='width:{pct}%'></i></span></p>"
        if pct is not None
        else (f"<p class=meta>Uncertainty {u:.2f}</p>" if u is not None else "")
    )
    guess = item["answer"]
    img = (
        f"<img class=q alt='query image' src='data:image/png;base64,{item['image_b64']}'>"
        if item.get("image_b64")
        else "<div class=q>(no image)</div>"
    )
    hidden = f"<input type=hidden name=csrf value='{e(csrf)}'>"
    if item["options_list"]:
        buttons = "".join(
            f"<button type=submit name=label value='{e(o)}' class='{'guess' if o == guess else ''}'>{e(o)}</button>"
            for o in item["options_list"]
        )
        answer = f"<div class=opts>{buttons}</div>"
    else:
        answer = (
            f"<p><input type=text name=label value='{e(guess)}' required maxlength=500 autofocus> "
            "<button type=submit class=guess>Save</button></p>"
        )
    return (
        f"<div class=row>{img}<div>"
        f"<p class=prompt>{e(item['prompt'])}</p>"
        f"<p class=meta>Student's guess: <b>{e(guess)}</b></p>{unsure}"
        f"<p class=meta>Query {qid[:8]} &middot; #{item['position']}</p>"
        f"<form method=post action='/label/{qid}'>{hidden}{answer}</form>"
        f"<form method=post action='/label/{qid}'>{hidden}"
        "<button type=submit name=action value=skip class=skip>Skip</button></form>"
        "</div></div>"
    )
