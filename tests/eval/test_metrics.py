"""Metrics against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest

from sftlab.eval.metrics import exact_match, rouge_tokenize, squad_normalize, text_metrics, token_f1


def test_squad_normalize_drops_case_punctuation_articles_and_spaces():
    assert squad_normalize("The  Quick, brown fox!") == "quick brown fox"
    assert squad_normalize("An apple a day; the end.") == "apple day end"
    # Articles only as whole words: "theory" and "another" stay.
    assert squad_normalize("theory another") == "theory another"
    # Unicode punctuation (CJK full stop, guillemets) goes too.
    assert squad_normalize("«Bonjour» 世界。") == "bonjour 世界"


def test_exact_match():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Paris", "Paris, France") == 0.0
    assert exact_match("", "") == 1.0


def test_token_f1_partial_overlap():
    # pred tokens after normalization: [cat, sat, on, mat] (4); ref: [cat, sat, on, red, mat, today] (6)
    # common = 4 -> P = 4/4, R = 4/6 -> F1 = 2 * 1 * (2/3) / (1 + 2/3) = 0.8
    assert token_f1("the cat sat on the mat", "a cat sat on a red mat today") == pytest.approx(0.8)


def test_token_f1_counts_repeated_tokens_once_per_match():
    # pred [go, go, go, stop], ref [go, stop, stop]: common = min(3,1) + min(1,2) = 2
    # P = 2/4, R = 2/3 -> F1 = 2 * (1/2) * (2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    assert token_f1("go go go stop", "go stop stop") == pytest.approx(4 / 7)


def test_token_f1_empty_cases():
    assert token_f1("", "") == 1.0
    assert token_f1("the", "a") == 1.0  # both normalize to nothing
    assert token_f1("", "paris") == 0.0
    assert token_f1("paris", "") == 0.0
    assert token_f1("london", "paris") == 0.0


def test_token_f1_splits_cjk_characters():
    # [我, 爱, 北, 京] vs [我, 爱, 上, 海]: common 2, P = R = 1/2 -> F1 = 1/2
    assert token_f1("我爱北京", "我爱上海") == pytest.approx(0.5)


def test_rouge_tokenizer_keeps_unicode_words_and_splits_cjk():
    assert rouge_tokenize("Hello, 世界! Ünïcödé_x café") == ["hello", "世", "界", "ünïcödé", "x", "café"]
    assert rouge_tokenize("こんにちは") == ["こ", "ん", "に", "ち", "は"]
    assert rouge_tokenize("  ,.!  ") == []


def test_text_metrics_hand_computed_single_row():
    pred, ref = "the cat sat on the mat", "the cat is on the mat"
    m = text_metrics([pred], [ref])
    # ROUGE-1: pred {the:2, cat, sat, on, mat}, ref {the:2, cat, is, on, mat}: overlap 2+1+1+1 = 5 of 6 each
    assert m["rouge-1"] == pytest.approx(100 * 5 / 6)
    # ROUGE-2: pred bigrams {the cat, cat sat, sat on, on the, the mat}, ref {the cat, cat is, is on, on the,
    # the mat}: overlap {the cat, on the, the mat} = 3 of 5 each
    assert m["rouge-2"] == pytest.approx(100 * 3 / 5)
    # ROUGE-L: LCS "the cat on the mat" = 5 of 6 each
    assert m["rouge-l"] == pytest.approx(100 * 5 / 6)
    assert m["exact_match"] == 0.0
    # SQuAD tokens drop "the": [cat, sat, on, mat] vs [cat, is, on, mat]: 3 common of 4 -> F1 0.75
    assert m["f1"] == pytest.approx(75.0)
    # BLEU: n-gram precisions 5/6, 3/5, 1/4 (only "on the mat"), 0/3; sacrebleu's default 'exp' smoothing turns
    # the first zero count into 1/(2 * total) = 1/6. Equal lengths -> brevity penalty 1. Geometric mean of the
    # precisions (as percentages).
    expected_bleu = (100 * 5 / 6 * 100 * 3 / 5 * 100 * 1 / 4 * 100 / (2 * 3)) ** 0.25
    assert m["bleu-4"] == pytest.approx(expected_bleu, abs=1e-6)


def test_text_metrics_averages_rows():
    m = text_metrics(["the cat sat on the mat", "hello world"], ["the cat is on the mat", "hello world"])
    assert m["rouge-1"] == pytest.approx(100 * (5 / 6 + 1) / 2)
    assert m["rouge-2"] == pytest.approx(100 * (3 / 5 + 1) / 2)
    assert m["exact_match"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(100 * (0.75 + 1) / 2)


def test_bleu_identical_is_100():
    text = "supervised fine tuning trains a language model on demonstrations of the task"
    m = text_metrics([text, "a b c d e f"], [text, "a b c d e f"])
    assert m["bleu-4"] == pytest.approx(100.0)
    assert m["rouge-l"] == pytest.approx(100.0)
    assert m["exact_match"] == pytest.approx(100.0)


def test_unicode_and_cjk():
    accented = text_metrics(["café naïve résumé"], ["café naïve résumé"])
    assert accented["rouge-1"] == pytest.approx(100.0)  # rouge-score's own tokenizer would give 0 here
    assert text_metrics(["café"], ["cafe"])["rouge-1"] == 0.0

    cjk = text_metrics(["我爱北京"], ["我爱上海"])
    # chars [我, 爱, 北, 京] vs [我, 爱, 上, 海]: R1 2/4; bigrams {我爱, 爱北, 北京} vs {我爱, 爱上, 上海}: 1/3; LCS 2/4
    assert cjk["rouge-1"] == pytest.approx(50.0)
    assert cjk["rouge-2"] == pytest.approx(100 / 3)
    assert cjk["rouge-l"] == pytest.approx(50.0)
    assert cjk["f1"] == pytest.approx(50.0)
    # BLEU sees characters too: identical Chinese sentences of >= 4 characters score 100 (one "word" would be
    # a single unigram and score 0).
    assert text_metrics(["我爱北京天安门"], ["我爱北京天安门"])["bleu-4"] == pytest.approx(100.0)


def test_empty_strings_do_not_crash():
    both_empty = text_metrics([""], [""])
    assert both_empty["rouge-1"] == both_empty["rouge-l"] == both_empty["exact_match"] == both_empty["f1"] == 100.0
    assert math.isfinite(both_empty["bleu-4"])

    one_empty = text_metrics(["", "paris"], ["london", ""])
    for key in ("rouge-1", "rouge-2", "rouge-l", "exact_match", "f1", "bleu-4"):
        assert one_empty[key] == 0.0, key

    assert text_metrics([], []) == {k: 0.0 for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match", "f1")}


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        text_metrics(["a", "b"], ["a"])


def test_tool_call_metrics_only_over_rows_whose_label_calls():
    from sftlab.eval.metrics import tool_call_metrics

    a = [{"name": "f", "arguments": {"x": 1}}]
    b = [{"name": "f", "arguments": {"x": 2}}]
    got = tool_call_metrics([a, b, None, a], [a, a, a, None])
    assert got == {"tool_call_exact_match": 100 / 3, "tool_call_name_match": 200 / 3, "tool_call_rows": 3}
    assert tool_call_metrics([a], [None]) == {}
