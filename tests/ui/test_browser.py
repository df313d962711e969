"""One scripted session in a real browser (Debian's chromium, driven by Playwright): new run from the form, live
curve, stop, interrupted + checkpoint, resume, finished, predictions, chat, data preview against the command line,
compare. Screenshots of each page go to $SFTLAB_SCREENSHOTS when set (`SFTLAB_SCREENSHOTS=docs/screenshots` refreshes
the README's), else to a temporary folder, so a test run leaves the tree as it was. A missing browser is a failure:
`make test` installs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.ui.conftest import SRC, running_app

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(os.environ.get("SFTLAB_SCREENSHOTS") or tempfile.mkdtemp(prefix="sftlab-ui-shots-"))
# Long enough that Stop lands before the run ends on a fast machine (24 steps could finish between the curve's second
# point and the click), short enough that the resumed run finishes in minutes on a loaded one.
MAX_STEPS = 150

FORM = {
    "model_name_or_path": "models/tiny", "train_file": "data/train.jsonl", "test_file": "data/test.jsonl",
    "output_dir": "saves/run1", "max_steps": str(MAX_STEPS), "logging_steps": "1", "save_steps": "1000",
    "per_device_train_batch_size": "2", "learning_rate": "1e-3", "max_new_tokens": "8", "data_cache_dir": "cache",
}
STARTED = [time.time()]
SELECTS = {"do_predict": "true", "bf16": "false"}


def cli_preview(workspace: Path, argv: list[str], n: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "sftlab", "data", "preview", *argv, "--n", str(n), "--format", "json"],
                         cwd=workspace, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.strip()]


def shot(page, name: str) -> None:
    print(f"[ui session] {name} at {time.time() - STARTED[0]:.1f} s", flush=True)
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size < 300_000, f"{path} is {path.stat().st_size} bytes"


def kill_leftover_runs(workspace: Path) -> None:
    """A failed assertion must not leave a training process behind (they are detached from the app on purpose)."""
    import signal

    from sftlab.ui.runs import LOCK_FILE, process_alive

    for lock in workspace.rglob(LOCK_FILE):
        pid = json.loads(lock.read_text()).get("pid")
        if process_alive(pid):
            os.killpg(pid, signal.SIGKILL)


def state_of(page) -> str:
    return page.get_attribute("#run-state [data-state]", "data-state")


def test_browser_session(ui_workspace):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make install` (it installs Debian's chromium) or "
                    "`apt-get install -y chromium`")
    from playwright.sync_api import expect, sync_playwright

    ws = ui_workspace
    STARTED[0] = time.time()
    try:
        with running_app(ws) as (base, _), sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(30_000)
            page.goto(base + "/#/")
            expect(page.locator('tr[data-run="saves/baseline"] [data-state]')).to_have_attribute("data-state", "finished")

            # New run: a bad value is shown beside its field, by the same parser as `sftlab train`.
            page.goto(base + "/#/new")
            page.wait_for_selector('[data-name="learning_rate"]', timeout=120_000)
            page.eval_on_selector_all("#form details", "els => els.forEach(d => d.open = true)")
            for name, value in FORM.items():
                page.fill(f'[data-name="{name}"]', value)
            for name, value in SELECTS.items():
                page.select_option(f'[data-name="{name}"]', value)
            page.fill('[data-name="learning_rate"]', "fast")
            page.click("#btn-check")
            expect(page.locator('[data-err="learning_rate"]')).to_contain_text("expected a number")
            page.fill('[data-name="learning_rate"]', FORM["learning_rate"])
            page.click("#btn-check")
            page.wait_for_selector("[data-example] mark.trained", timeout=60_000)
            expect(page.locator('[data-err="learning_rate"]')).to_have_text("")

            # The highlighted tokens are exactly the trained ones of `sftlab data preview --format json`.
            argv = [a for k, v in {**FORM, **SELECTS}.items() for a in (f"--{k}", v)]
            expected = cli_preview(ws, argv, 3)
            shown = page.eval_on_selector_all("[data-example]", """els => els.map(e => ({source: e.dataset.source,
                spans: [...e.children].map(s => ({trained: s.tagName === 'MARK', start: +s.dataset.start,
                end: +s.dataset.end, text: s.textContent}))}))""")
            assert [s["source"] for s in shown] == [r["source"] for r in expected]
            for s, r in zip(shown, expected):
                mask = [False] * len(r["input_ids"])
                for span in s["spans"]:
                    mask[span["start"]:span["end"]] = [span["trained"]] * (span["end"] - span["start"])
                assert mask == [label != -100 for label in r["labels"]]
                assert "".join(span["text"] for span in s["spans"]) == r["text"]
            page.eval_on_selector_all('#form details[data-group="all TrainingArguments"], #form details[data-group="rqa"]',
                                      "els => els.forEach(d => d.open = false)")
            page.evaluate("window.scrollTo(0, 0)")
            shot(page, "new-run")

            # Launch: the run page's loss curve gains points while it trains.
            page.click("#btn-launch")
            page.wait_for_url("**/#/run/saves%2Frun1")
            page.wait_for_function("() => +document.querySelector('#chart-loss svg')?.dataset.points >= 1", timeout=180_000)
            first = int(page.get_attribute("#chart-loss svg", "data-points"))
            page.wait_for_function(f"() => +document.querySelector('#chart-loss svg')?.dataset.points > {first}",
                                   timeout=120_000)
            assert state_of(page) == "running"
            page.hover("#chart-loss svg")  # the hover read-out names the series and the step
            expect(page.locator("#tooltip")).to_contain_text("train loss (raw)")
            expect(page.locator("#tooltip")).to_contain_text("(step ")
            shot(page, "run-live")

            # One run at a time: a second launch is refused with a message.
            refused = page.evaluate("""() => fetch('/api/launch', {method: 'POST', headers: {'Content-Type':
                'application/json'}, body: JSON.stringify({values: {model_name_or_path: 'models/tiny', train_file:
                'data/train.jsonl', output_dir: 'saves/run2'}})}).then(r => r.json().then(j => [r.status, j]))""")
            assert refused[0] == 409 and "one run at a time" in refused[1]["errors"]["_form"]

            # Stop: a checkpoint is saved and the run shows as interrupted.
            page.click("#btn-stop")
            expect(page.locator("#run-state [data-state]")).to_have_attribute("data-state", "interrupted", timeout=180_000)
            expect(page.locator("#checkpoints")).to_contain_text("checkpoint-")
            stopped_at = int(page.inner_text("#checkpoints").split("checkpoint-")[-1].split(",")[0])
            assert 0 < stopped_at < MAX_STEPS
            shot(page, "run-interrupted")

            # Resume: it continues from the checkpoint and finishes.
            page.click("#btn-resume")
            expect(page.locator("#run-state [data-state]")).to_have_attribute("data-state", "running", timeout=30_000)
            expect(page.locator("#run-state [data-state]")).to_have_attribute("data-state", "finished", timeout=900_000)
            steps = [json.loads(l)["step"] for l in (ws / "saves/run1/trainer_log.jsonl").read_text().splitlines()]
            assert max(steps) == MAX_STEPS and len([s for s in steps if s <= stopped_at]) >= 1

            # Predictions, scored per row, worst first.
            page.wait_for_selector("#pred-file option", state="attached")
            page.click("#pred-open")
            page.wait_for_selector("#pred-table tbody tr")
            f1 = [float(x) for x in page.eval_on_selector_all("#pred-table tbody tr td:nth-child(2)", "e => e.map(x => x.textContent)")]
            assert len(f1) == 3 and f1 == sorted(f1)
            page.click('#pred-table th[data-key="row"]')
            rows = page.eval_on_selector_all("#pred-table tbody tr td:first-child", "e => e.map(x => +x.textContent)")
            assert rows == [1, 2, 3]
            shot(page, "run-finished")

            # Chat with the finished run: the answer arrives in pieces; a second turn; reset.
            page.goto(base + "/#/chat/saves/run1")
            page.wait_for_selector("#chat-run option", state="attached")
            page.fill("#chat-max", "24")
            page.fill("#chat-input", "Add 3 and 4.")
            page.click("#chat-send")
            page.wait_for_selector(".msg.assistant[data-done]", timeout=120_000)
            reply = page.locator(".msg.assistant").last
            assert int(reply.get_attribute("data-pieces") or 0) >= 2, "the reply was not streamed in pieces"
            assert reply.inner_text().strip() and "[error" not in reply.inner_text()
            page.fill("#chat-input", "And 5 and 6?")
            page.click("#chat-send")
            page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length == 2 && "
                                   "document.querySelectorAll('.msg.assistant')[1].dataset.done", timeout=120_000)
            assert page.locator(".msg.user").count() == 2
            shot(page, "chat")
            page.click("#chat-reset")
            assert page.locator(".msg").count() == 0

            # Compare: curves overlaid, the differing hyperparameters highlighted.
            page.goto(base + "/#/compare/saves%2Frun1,saves%2Fbaseline")
            page.wait_for_selector("#cmp-table")
            assert page.locator('#chart-cmp path[data-series="saves/run1"]').count() == 1
            assert page.locator('#chart-cmp path[data-series="saves/baseline"]').count() == 1
            lr = page.locator('#cmp-table tr[data-key="training.learning_rate"]')
            assert "differs" in lr.get_attribute("class")
            assert "differs" not in page.locator('#cmp-table tr[data-key="data.train_file"]').get_attribute("class")
            shot(page, "compare")

            page.goto(base + "/#/")
            expect(page.locator('tr[data-run="saves/run1"] [data-state]')).to_have_attribute("data-state", "finished")
            shot(page, "runs")
            browser.close()
    finally:
        kill_leftover_runs(ws)
