"""sftlab's one logger: `[sftlab] ...` lines from the main process only; implementation details only with
``--verbose``.

    from sftlab.logs import log
    log.info("what the user needs")         # shown
    log.debug("what the code did, and why")  # shown with --verbose
    log.warning("something to act on")      # stderr
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("sftlab")


class _MainProcessOnly(logging.Filter):
    """Every rank of a distributed run runs the same code; one of them speaks."""

    def filter(self, record: logging.LogRecord) -> bool:
        return int(os.environ.get("RANK", "0")) == 0


class _ByLevel(logging.Handler):
    """Info and details to stdout, warnings and errors to stderr; the streams are looked up at each call, so output
    captured by tests or redirected later still arrives."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def _setup() -> None:
    handler = _ByLevel()
    handler.setFormatter(logging.Formatter("[sftlab] %(message)s"))
    handler.addFilter(_MainProcessOnly())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def set_verbose(on: bool) -> None:
    """``--verbose``: also show implementation details (what was sped up, cached, rebuilt, ...) and the libraries'
    own progress bars and warnings."""
    log.setLevel(logging.DEBUG if on else logging.INFO)
    quiet_third_party()


def prepare_process() -> None:
    """What every entry point (the CLI, the demo, the probe's child process) does first: Hugging Face libraries stay
    offline (nothing is downloaded at run time) and their noise is hidden."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # child processes start quiet too
    quiet_third_party()


_LIBRARIES = r"(transformers|peft|accelerate|torch|datasets|huggingface_hub)(\.|$)"


def quiet_third_party() -> None:
    """Unless ``--verbose``: the progress bars, deprecation notices and warnings that libraries address to their own
    users (transformers, peft, accelerate, torch, datasets), not to sftlab's, are not shown; sftlab's own warnings
    and everything else still are."""
    import warnings

    verbose = log.isEnabledFor(logging.DEBUG)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        # The newest filter wins (an identical older one is replaced), so the two settings can follow each other.
        warnings.filterwarnings("default" if verbose else "ignore", category=category, module=_LIBRARIES)
    _set_library_verbosity(verbose)


def _set_library_verbosity(verbose: bool) -> None:
    """transformers' and datasets' loggers and progress bars (the per-tensor "Loading weights" bars would drown
    the one progress bar that matters)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    if verbose:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        import datasets

        if verbose:
            datasets.utils.logging.set_verbosity_warning()
            datasets.enable_progress_bars()
        else:
            datasets.utils.logging.set_verbosity_error()
            datasets.disable_progress_bars()
    except ImportError:
        pass


_setup()
