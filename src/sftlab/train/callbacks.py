"""Trainer callbacks: the JSONL training log with tokens/s and ETA, a progress line, and a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from transformers import TrainerCallback


def _fmt_secs(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class LogCallback(TrainerCallback):
    """Writes `trainer_log.jsonl` (main process only) and prints a progress line with loss, lr, tokens/s and ETA."""

    def __init__(self, trainer_ref, output_dir: str, stream=None):
        self.trainer_ref = trainer_ref  # a callable returning the SFTTrainer (it is built after its callbacks)
        self.path = os.path.join(output_dir, "trainer_log.jsonl")
        self.stream = stream or sys.stdout
        self.start = None
        self.start_step = 0
        self.last_time = None
        self.last_tokens = 0
        self.last_trained = 0

    def on_train_begin(self, args, state, control, **kw):
        self.start = self.last_time = time.time()
        self.start_step = state.global_step
        tr = self.trainer_ref()
        self.last_tokens, self.last_trained = tr.tokens_seen, tr.trained_tokens_seen
        if state.is_world_process_zero and state.global_step == 0 and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run; a resumed run appends

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or self.start is None:
            return
        now = time.time()
        tr = self.trainer_ref()
        elapsed = now - self.start
        done = max(state.global_step - self.start_step, 1)
        remaining = elapsed / done * max(state.max_steps - state.global_step, 0)
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            dt = max(now - self.last_time, 1e-9)
            # This rank's rate times the number of ranks: ranks see equal-sized shards of the data.
            tps = (tr.tokens_seen - self.last_tokens) / dt * args.world_size
            ttps = (tr.trained_tokens_seen - self.last_trained) / dt * args.world_size
            self.last_time, self.last_tokens, self.last_trained = now, tr.tokens_seen, tr.trained_tokens_seen
            record.update(
                loss=logs.get("loss"), learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                tokens_per_second=round(tps, 2), trained_tokens_per_second=round(ttps, 2),
            )
        else:
            record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        record.update(elapsed=round(elapsed, 2), remaining=round(remaining, 2))
        if state.is_world_process_zero:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            self._print(state, record)

    def _print(self, state, r: dict) -> None:
        total = max(state.max_steps, 1)
        width = 20
        filled = int(width * state.global_step / total)
        bar = "#" * filled + "-" * (width - filled)
        if "loss" in r:
            msg = (f"[{bar}] {state.global_step}/{total} loss {r['loss']:.4f} lr {r['learning_rate']:.2e} "
                   f"tok/s {r['tokens_per_second']:.0f} elapsed {_fmt_secs(r['elapsed'])} "
                   f"ETA {_fmt_secs(r['remaining'])}")
        else:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                     if k.startswith(("eval_", "e2e_"))}
            msg = f"[{bar}] {state.global_step}/{total} " + " ".join(f"{k} {v}" for k, v in shown.items())
        print(msg, file=self.stream, flush=True)


class GracefulStop(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def on_train_begin(self, args, state, control, **kw):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        print("\n[sftlab] Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort now)",
              file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kw):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kw):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.requested and state.is_world_process_zero:
            print(f"[sftlab] stopped at step {state.global_step}; resume with the same command "
                  f"(it continues from the newest checkpoint in {args.output_dir})", file=sys.stderr, flush=True)
