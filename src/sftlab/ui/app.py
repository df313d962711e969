"""The web app: Starlette routes over sftlab.ui's modules, server-sent events for live updates, and the guards.

Guards, on every request (pages, API, the event stream, static files):
* bound to a loopback address, the Host header must name a loopback host (no DNS-rebinding from a web page);
  bound to any other host, the access token is required (query `token=` once, then a cookie, or a Bearer header);
* requests that change something (POST) must be JSON and, when the browser sends an Origin, come from this app.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import secrets
import threading
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sftlab.errors import SftlabError
from sftlab.ui import form, launch, runs
from sftlab.ui.chat import ChatService
from sftlab.ui.workspace import OutsideWorkspace, resolve_inside

STATIC = Path(__file__).parent / "static"
COOKIE = "sftlab_token"
POLL_SECONDS = 1.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware: the access token (non-loopback binds), the Host check (loopback binds), JSON-only POSTs."""

    def __init__(self, app, token: str | None, loopback: bool):
        self.app, self.token, self.loopback = app, token, loopback

    def _token_of(self, scope) -> tuple[str | None, bool]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "token" in query:
            return query["token"][0], True
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        cookie = SimpleCookie(headers.get("cookie", ""))
        return (cookie[COOKIE].value if COOKIE in cookie else None), False

    def _refusal(self, scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "").rsplit(":", 1)[0] if not headers.get("host", "").startswith("[") else \
            headers.get("host", "").split("]")[0] + "]"
        if self.loopback and not is_loopback(host):
            return f"Host '{host}' refused: this app answers on localhost only"
        if self.token is not None:
            given, _ = self._token_of(scope)
            if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
                return "access token required: open the URL printed by `sftlab ui` (it ends with ?token=...)"
        if scope.get("method") == "POST":
            if not headers.get("content-type", "").startswith("application/json"):
                return "POST requests must be JSON"
            origin = headers.get("origin")
            if origin and origin.split("://", 1)[-1] != headers.get("host"):
                return f"Origin '{origin}' refused"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        why = self._refusal(scope)
        if why:
            status = 401 if "token" in why else 403
            return await PlainTextResponse(why, status_code=status)(scope, receive, send)
        given, from_query = self._token_of(scope)
        if self.token is not None and from_query:
            async def send_with_cookie(message):
                if message["type"] == "http.response.start":
                    cookie = f"{COOKIE}={given}; HttpOnly; SameSite=Strict; Path=/"
                    message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
                await send(message)
            return await self.app(scope, receive, send_with_cookie)
        return await self.app(scope, receive, send)


class UI:
    """The routes' state: the workspace, the chat model, how many runs may run at once."""

    def __init__(self, workspace: Path, max_parallel: int = 1):
        self.workspace = workspace.resolve()
        self.max_parallel = max_parallel
        self.chat = ChatService()

    def run_dir(self, name: str | None) -> Path:
        path = resolve_inside(self.workspace, name or "")
        if not path.is_dir() or not runs.is_run_dir(path):
            raise OutsideWorkspace(f"{name}: no run directory of that name in the workspace")
        return path


def _error(e: Exception, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=status)


async def _body(request: Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise SftlabError("expected a JSON object")
    return data


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


def build_app(workspace: Path, token: str | None = None, loopback: bool = True, max_parallel: int = 1):
    ui = UI(workspace, max_parallel)
    # transformers is imported and the form built in the background, so the first page that needs them is quick.
    threading.Thread(target=form.form_schema, daemon=True).start()

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def api_runs(request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(runs.list_runs, ui.workspace))

    async def api_run(request: Request) -> Response:
        try:
            path = ui.run_dir(request.query_params.get("name"))
        except SftlabError as e:
            return _error(e, 404)
        return JSONResponse(await asyncio.to_thread(runs.detail, ui.workspace, path))

    async def api_predictions(request: Request) -> Response:
        try:
            path = ui.run_dir(request.query_params.get("name"))
            name = request.query_params.get("file", runs.PREDICTION_FILES[0])
            if name not in runs.PREDICTION_FILES or not (path / name).is_file():
                raise OutsideWorkspace(f"{name}: no such predictions file in this run")
        except SftlabError as e:
            return _error(e, 404)
        return JSONResponse(await asyncio.to_thread(runs.scored_predictions, path / name))

    async def api_compare(request: Request) -> Response:
        names = [n for n in request.query_params.get("names", "").split(",") if n]
        try:
            paths = [ui.run_dir(n) for n in names]
        except SftlabError as e:
            return _error(e, 404)
        if len(paths) < 2:
            return _error(SftlabError("choose two or more runs to compare"))
        return JSONResponse(await asyncio.to_thread(runs.compare, ui.workspace, paths))

    async def api_schema(request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(form.form_schema))

    async def api_check(request: Request) -> Response:
        try:
            body = await _body(request)
        except SftlabError as e:
            return _error(e)
        return JSONResponse(await asyncio.to_thread(form.check, ui.workspace, body))

    async def api_launch(request: Request) -> Response:
        try:
            body = await _body(request)
        except SftlabError as e:
            return _error(e)
        busy = await asyncio.to_thread(launch.running_runs, ui.workspace)
        if len(busy) >= ui.max_parallel:  # before the checks, which create the output directory
            return JSONResponse({"ok": False, "errors": {"_form": launch.busy_message(busy)}}, status_code=409)
        result = await asyncio.to_thread(form.check, ui.workspace, {**body, "preview": False})
        if not result["ok"]:
            return JSONResponse(result, status_code=400)
        run_dir = resolve_inside(ui.workspace, result["output_dir"])
        try:
            pid = await asyncio.to_thread(launch.launch, ui.workspace, run_dir, result["argv"], ui.max_parallel)
        except SftlabError as e:
            return JSONResponse({"ok": False, "errors": {"_form": str(e)}}, status_code=409)
        return JSONResponse({"ok": True, "pid": pid, "name": run_dir.relative_to(ui.workspace).as_posix()})

    async def api_stop(request: Request) -> Response:
        try:
            path = ui.run_dir((await _body(request)).get("name"))
            pid = launch.stop(path)
        except SftlabError as e:
            return _error(e, 409)
        return JSONResponse({"ok": True, "pid": pid})

    async def api_resume(request: Request) -> Response:
        try:
            path = ui.run_dir((await _body(request)).get("name"))
            pid = await asyncio.to_thread(launch.resume, ui.workspace, path, ui.max_parallel)
        except SftlabError as e:
            return _error(e, 409)
        return JSONResponse({"ok": True, "pid": pid})

    async def api_chat(request: Request) -> Response:
        try:
            body = await _body(request)
            path = ui.run_dir(body.get("name"))
            messages = body.get("messages") or []
            if not messages or not isinstance(messages, list) or messages[-1].get("role") != "user":
                raise SftlabError("messages: end the conversation with a user turn")
        except SftlabError as e:
            return _error(e)
        if body.get("base"):
            config = runs.read_config(path)
            model = (config.get("model") or {}).get("model_name_or_path")
            if not model:
                return _error(SftlabError(f"{body.get('name')}: no base model recorded in sftlab_config.yaml"))
            try:
                form.check_model_path(ui.workspace, model)
            except SftlabError as e:
                return _error(e)
            template_dir = path
        else:
            model, template_dir = str(path), None
        pieces = ui.chat.stream(model, messages, int(body.get("max_new_tokens") or 128), template_dir)

        async def events():
            iterator = iter(pieces)
            try:
                while True:
                    piece = await asyncio.to_thread(next, iterator, None)
                    if piece is None:
                        break
                    yield _sse("token", piece)
                yield _sse("done", {})
            except Exception as e:
                yield _sse("error", str(e))

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def api_events(request: Request) -> Response:
        name = request.query_params.get("name")
        path = None
        if name:
            try:
                path = ui.run_dir(name)
            except SftlabError as e:
                return _error(e, 404)

        async def events():
            last_runs = last_run = None
            while not await request.is_disconnected():
                listed = await asyncio.to_thread(runs.list_runs, ui.workspace)
                text = json.dumps(listed, default=str)
                if text != last_runs:
                    last_runs = text
                    yield f"event: runs\ndata: {text}\n\n"
                if path is not None:
                    run = json.dumps(await asyncio.to_thread(runs.detail, ui.workspace, path), default=str)
                    if run != last_run:
                        last_run = run
                        yield f"event: run\ndata: {run}\n\n"
                await asyncio.sleep(POLL_SECONDS)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    routes = [
        Route("/", index),
        Route("/api/runs", api_runs),
        Route("/api/run", api_run),
        Route("/api/predictions", api_predictions),
        Route("/api/compare", api_compare),
        Route("/api/schema", api_schema),
        Route("/api/check", api_check, methods=["POST"]),
        Route("/api/launch", api_launch, methods=["POST"]),
        Route("/api/stop", api_stop, methods=["POST"]),
        Route("/api/resume", api_resume, methods=["POST"]),
        Route("/api/chat", api_chat, methods=["POST"]),
        Route("/api/events", api_events),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Guard(Starlette(routes=routes), token, loopback)


def serve(workspace: str, host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
          max_parallel: int = 1) -> None:
    """Run the app until Ctrl-C. Runs it started keep running (they are separate processes)."""
    import uvicorn

    root = Path(workspace).resolve()
    if not root.is_dir():
        raise SftlabError(f"--workspace: not a directory: {workspace}")
    loopback = is_loopback(host)
    if not loopback and not token:
        token = secrets.token_urlsafe(24)
    os.chdir(root)  # runs' relative paths (data, models, output dirs) are relative to the workspace
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"sftlab ui: workspace {root}\n  open {url}" + ("" if loopback else "\n  (the token is required: "
          "the app is reachable from other machines)"), flush=True)
    uvicorn.run(build_app(root, token, loopback, max_parallel), host=host, port=port, log_level="warning")
