"""Trainer callbacks: the JSONL training log with tokens/s and ETA, a progress line, and a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from transformers import TrainerCallback

from sftlab.files import atomic_writer


def _fmt_secs(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _drop_records_after(path: str, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: forget what the interrupted run logged for them."""
    kept = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                if json.loads(line).get("step", 0) > step:
                    continue
            except (ValueError, AttributeError):
                continue  # a line cut short by the kill
            kept.append(line if line.endswith("\n") else line + "\n")
    with atomic_writer(path) as fh:
        fh.writelines(kept)


class LogCallback(TrainerCallback):
    """Writes `trainer_log.jsonl` (main process only) and shows progress: a progress bar with loss, tokens/s and ETA
    on a terminal, a log line per logging step otherwise. Tokens/s leave out the time spent evaluating."""

    def __init__(self, token_counts, output_dir: str, stream=None):
        self.token_counts = token_counts  # () -> (non-pad, trained) tokens seen so far on this rank
        self.path = os.path.join(output_dir, "trainer_log.jsonl")
        self.stream = stream or sys.stdout
        self.start = None
        self.start_step = 0
        self.last_time = None
        self.last_step_end = None
        self.last_tokens = 0
        self.last_trained = 0
        self.bar = None

    def on_train_begin(self, args, state, control, **kw):
        self.start = self.last_time = self.last_step_end = time.time()
        self.start_step = state.global_step
        self.last_tokens, self.last_trained = self.token_counts()
        if state.is_world_process_zero and os.path.exists(self.path):
            if state.global_step == 0:
                os.remove(self.path)  # a fresh run; a resumed run appends
            else:
                _drop_records_after(self.path, state.global_step)
        if state.is_world_process_zero and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, file=self.stream, unit="step",
                            dynamic_ncols=True, leave=True)

    def on_step_end(self, args, state, control, **kw):
        self.last_step_end = time.time()
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_evaluate(self, args, state, control, **kw):
        # Evaluation ran since the last step (and the log line after it): that time is not training time.
        now = time.time()
        paused = now - max(self.last_time or now, self.last_step_end or now)
        if self.last_time is not None:
            self.last_time += max(paused, 0.0)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or self.start is None:
            return
        now = time.time()
        tokens, trained = self.token_counts()
        elapsed = now - self.start
        done = max(state.global_step - self.start_step, 1)
        remaining = elapsed / done * max(state.max_steps - state.global_step, 0)
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            dt = max(now - self.last_time, 1e-9)
            # This rank's rate times the number of ranks: ranks see equal-sized shards of the data.
            tps = (tokens - self.last_tokens) / dt * args.world_size
            ttps = (trained - self.last_trained) / dt * args.world_size
            self.last_time, self.last_tokens, self.last_trained = now, tokens, trained
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
            self._show(state, record)

    def _show(self, state, r: dict) -> None:
        if "loss" in r and self.bar is not None:
            self.bar.set_postfix_str(f"loss {r['loss']:.4f}, {r['tokens_per_second']:.0f} tok/s", refresh=True)
            return
        msg = _progress_line(state, r)
        if msg is None:
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)


def _is_terminal(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def _progress_line(state, r: dict) -> str | None:
    """A logging step as one line (output that is not a terminal, and evaluation results)."""
    total = max(state.max_steps, 1)
    width = 20
    filled = int(width * state.global_step / total)
    bar = "#" * filled + "-" * (width - filled)
    if "loss" in r:
        return (f"[{bar}] {state.global_step}/{total} loss {r['loss']:.4f} lr {r['learning_rate']:.2e} "
                f"tok/s {r['tokens_per_second']:.0f} elapsed {_fmt_secs(r['elapsed'])} "
                f"ETA {_fmt_secs(r['remaining'])}")
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k.startswith(("eval_", "e2e_"))}
    if not shown:
        return None  # the end-of-training summary: the workflow prints it
    return f"[{bar}] {state.global_step}/{total} " + " ".join(f"{k} {v}" for k, v in shown.items())


class GracefulStop(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. A second Ctrl-C interrupts at once.

    Distributed runs: the request is shared across ranks at every step end, so all ranks stop after the same step
    (a terminal's Ctrl-C reaches them at slightly different times); and torchrun relays the Ctrl-C it receives
    itself to the workers a moment later, so a second SIGINT within `relay_window` seconds counts as the same one.
    """

    relay_window = 2.0

    def __init__(self):
        self.requested = False
        self._previous = None
        self._first_at = 0.0

    def on_train_begin(self, args, state, control, **kw):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._previous = None

    def _handler(self, signum, frame):
        if self.requested and time.monotonic() - self._first_at < self.relay_window:
            return
        if self.requested:
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        self._first_at = time.monotonic()
        if os.environ.get("RANK", "0") == "0":  # every rank gets the signal; one message is enough
            print("\n[sftlab] Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort now)",
                  file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kw):
        if args.world_size > 1:
            self.requested = _any_rank(self.requested, args.device)
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


def _any_rank(flag: bool, device) -> bool:
    """True on every rank if it is True on any rank (one tiny all-reduce)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
