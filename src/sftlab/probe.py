"""A short measured training run for the cost estimate: `python -m sftlab.probe OUT.json CONFIG [--key value]`.

It runs `sftlab train`'s workflow unchanged on the given configuration (the caller points it at a small probe file
and a few `max_steps`) and writes, to OUT.json, each optimizer step's wall seconds and the process's peak resident
memory. A child process of its own, so the peak is the training's alone."""

from __future__ import annotations

import json
import sys
import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    def __init__(self):
        self.steps: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(time.perf_counter() - self._t0)


def main(argv: list[str]) -> int:
    from sftlab.config import parse_config
    from sftlab.logs import prepare_process
    from sftlab.train.trainer import peak_rss_bytes
    from sftlab.workflow import run_sft

    out, rest = argv[0], argv[1:]
    prepare_process()
    cfg = parse_config(rest)
    cfg.training.do_train = True
    timer = StepTimer()
    run_sft(cfg, callbacks=[timer])
    with open(out, "w", encoding="utf-8") as fh:
        json.dump({"step_seconds": timer.steps, "peak_rss": peak_rss_bytes()}, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
