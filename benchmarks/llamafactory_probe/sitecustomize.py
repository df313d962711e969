"""Measures a `llamafactory-cli train` run the way benchmarks/throughput.py measures TRL and sftlab.

throughput.py starts the unmodified `llamafactory-cli train config.yaml` of LLaMA-Factory's own virtual environment
with this directory on PYTHONPATH, so Python imports this module at start-up (its `sitecustomize` hook). With
SFTLAB_BENCH_RESULT set, it wraps every transformers Trainer the run creates:

* the data collator is wrapped by throughput.py's `CountingWrapper` (non-pad tokens, and trained tokens = labels
  != -100 after the shift, per batch actually fed), exactly as for TRL;
* throughput.py's `Recorder` callback logs the per-step losses, the high-water mark of resident memory when
  training ends and the held-out loss (the same function for every configuration);
* `train_runtime` is the Trainer's own metric.

At exit the figures are written as JSON to SFTLAB_BENCH_RESULT, together with the whole process's peak RSS
(ru_maxrss, as for the other configurations). Without SFTLAB_BENCH_RESULT this module does nothing.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys
from importlib.metadata import version


def _install(result_path: str) -> None:
    sys.path.insert(0, os.environ["SFTLAB_BENCH_DIR"])  # benchmarks/, for throughput.py's measuring code
    import throughput  # stdlib-only at import time
    import transformers

    record: dict = {}
    counters: list = []
    original_init, original_train = transformers.Trainer.__init__, transformers.Trainer.train

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        from transformers import AutoTokenizer

        counters.append(throughput.CountingWrapper(self.data_collator))
        self.data_collator = counters[-1]
        tokenizer = AutoTokenizer.from_pretrained(os.environ["SFTLAB_BENCH_MODEL"])
        self.add_callback(throughput.make_recorder(tokenizer, os.environ["SFTLAB_BENCH_EVAL"], record))

    def train(self, *args, **kwargs):
        result = original_train(self, *args, **kwargs)
        record["runtime"] = result.metrics["train_runtime"]
        record["bf16"] = bool(self.args.bf16)
        record["gradient_checkpointing"] = bool(getattr(self.model, "is_gradient_checkpointing", False))
        return result

    def write() -> None:
        if "runtime" not in record:
            return  # the run failed before training ended: throughput.py reports the exit status and output
        record.update(tokens=sum(c.tokens for c in counters), trained=sum(c.trained for c in counters),
                      examples=sum(c.examples for c in counters),
                      peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      versions={p: version(p) for p in ("llamafactory", "torch", "transformers", "peft")})
        with open(result_path, "w") as fh:
            json.dump(record, fh)

    transformers.Trainer.__init__, transformers.Trainer.train = init, train
    atexit.register(write)


if os.environ.get("SFTLAB_BENCH_RESULT"):
    _install(os.environ["SFTLAB_BENCH_RESULT"])
