"""The guards of the running app (`python -m sftlab ui`): off loopback every page, API call, static file and the
event stream needs the token; on loopback, foreign Host and Origin headers and non-JSON POSTs are refused."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.ui.conftest import running_app, write_finished_run

GETS = ["/", "/static/app.js", "/static/chart.js", "/api/runs", "/api/run?name=saves/a", "/api/schema",
        "/api/events", "/api/events?name=saves/a", "/api/compare?names=saves/a,saves/a",
        "/api/predictions?name=saves/a"]
POSTS = ["/api/check", "/api/launch", "/api/stop", "/api/resume", "/api/chat"]


def fetch(url, data=None, headers=None, read=True):
    """(status, headers, first bytes of the body)."""
    body = None if data is None else json.dumps(data).encode()
    h = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(url, data=body, headers={**h, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read(200) if read else b""
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read(200)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    write_finished_run(ws / "saves" / "a", "m", "d.jsonl", 1e-4, [2.0, 1.0])
    return ws


def test_off_loopback_everything_needs_the_token(workspace):
    with running_app(workspace, "--host", "0.0.0.0") as (base, printed):
        token = printed.split("?token=", 1)[1]
        assert len(token) >= 24
        for path in GETS:
            status, _, body = fetch(base + path)
            assert status == 401, path
            assert b"token" in body
            assert fetch(base + path, headers={"Authorization": "Bearer wrong" + token})[0] == 401, path
        for path in POSTS:
            assert fetch(base + path, {"name": "saves/a"})[0] == 401, path
        status, headers, _ = fetch(f"{base}/?token={token}")
        assert status == 200 and "HttpOnly" in headers["set-cookie"]
        cookie = headers["set-cookie"].split(";")[0]
        assert fetch(base + "/api/runs", headers={"Cookie": cookie})[0] == 200
        assert fetch(base + "/api/runs", headers={"Authorization": f"Bearer {token}"})[0] == 200
        status, headers, body = fetch(f"{base}/api/events?token={token}")
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        assert body.startswith(b"event: runs")


def test_a_given_token_is_used(workspace):
    with running_app(workspace, "--host", "0.0.0.0", "--token", "s3cret-token-for-the-test") as (base, printed):
        assert printed.endswith("?token=s3cret-token-for-the-test")
        assert fetch(base + "/api/runs")[0] == 401
        assert fetch(base + "/api/runs?token=s3cret-token-for-the-test")[0] == 200


def test_loopback_guards(workspace):
    with running_app(workspace) as (base, printed):
        assert "token" not in printed
        status, _, body = fetch(base + "/api/runs")
        assert status == 200 and body.startswith(b'[{"name":"saves/a"')
        assert fetch(base + "/", headers={"Host": "attacker.example"})[0] == 403
        assert fetch(base + "/api/check", {"values": {}}, headers={"Origin": "http://attacker.example"})[0] == 403
        req = urllib.request.Request(base + "/api/stop", data=b"name=saves/a",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 403
        for name in ("../x", "/etc", "saves/missing"):
            assert fetch(f"{base}/api/run?name={name}")[0] == 404
        assert fetch(f"{base}/api/predictions?name=saves/a&file=../../etc/passwd")[0] == 404
        assert fetch(base + "/static/../runs.py")[0] == 404
        status, _, body = fetch(base + "/api/stop", {"name": "saves/a"})
        assert status == 409 and b"not running" in body
