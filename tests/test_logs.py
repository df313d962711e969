"""sftlab.logs: one logger; the main process speaks; details only with --verbose; library noise hidden."""

from __future__ import annotations

import warnings

from sftlab.config import parse_command
from sftlab.logs import log, quiet_third_party, set_verbose


def test_details_only_with_verbose(capsys):
    set_verbose(False)
    log.info("shown")
    log.debug("detail")
    log.warning("act on this")
    out, err = capsys.readouterr()
    assert out == "[sftlab] shown\n" and err == "[sftlab] act on this\n"
    parse_command(["--verbose", "--lora_rank", "4"])  # every command takes --verbose
    try:
        log.debug("detail")
        assert capsys.readouterr().out == "[sftlab] detail\n"
    finally:
        set_verbose(False)


def test_only_the_main_process_speaks(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log.info("from rank 1")
    log.warning("from rank 1")
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    log.info("from rank 0")
    assert capsys.readouterr().out == "[sftlab] from rank 0\n"


def test_library_deprecations_are_hidden_but_not_others():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn_explicit("old API", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("ours", FutureWarning, "x.py", 1, module="sftlab.something")
    assert [str(w.message) for w in caught] == ["ours"]


def test_library_progress_bars_only_with_verbose(tmp_path, tiny_model_dir, capfd):
    """A tiny `sftlab train` run: transformers' per-tensor "Loading weights" bar and its notices are hidden; with
    --verbose they are shown again (and the implementation details with them)."""
    from sftlab.cli import main
    from tests.test_workflow import base_args, write_data

    train, _ = write_data(tmp_path, n=8)
    capfd.readouterr()  # the fixture's own output (the tiny model being saved)

    def run(out: str, *extra: str) -> str:
        args = base_args(tiny_model_dir, train, tmp_path / out, "--save_strategy", "no", *extra)
        args[args.index("--max_steps") + 1] = "1"
        assert main(args) == 0
        captured = capfd.readouterr()
        return captured.out + captured.err

    quiet = run("quiet")
    assert "[sftlab] model " in quiet and "train_loss" in quiet
    assert "Loading weights" not in quiet and "[transformers]" not in quiet and "fused autograd" not in quiet
    try:
        loud = run("verbose", "--verbose")
    finally:
        set_verbose(False)
    assert "Loading weights" in loud and "fused autograd" in loud
    # Back to quiet for whatever runs next in this process.
    from transformers.utils import logging as hf_logging

    assert not hf_logging.is_progress_bar_enabled()
