"""Golden tests: for each format and template, exactly which text is trained.

The expected strings are written out by hand from the template definitions; `trained_text` is the decoding of the
tokens whose label is not -100, concatenated in order."""

from __future__ import annotations


import pytest

from sftlab.data.dataset import EncodeSettings, encode_row
from sftlab.data.formats import FormatOptions
from sftlab.data.loader import Row
from sftlab.data.templates import Message, load_template
from sftlab.data.tokenize import IGNORE_INDEX, encode_messages, encode_prompt
from sftlab.config import DataArguments

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def trained_text(tok, enc) -> str:
    return tok.decode([i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX], skip_special_tokens=False)


def full_text(tok, enc) -> str:
    return tok.decode(enc.input_ids, skip_special_tokens=False)


def settings(train_on="completion", cutoff=1024, truncation="keep_answer", fmt=None):
    return EncodeSettings(train_on, cutoff, truncation, fmt, {}, FormatOptions())


def encode_one(tok, template, data: dict, **kw):
    fmt_rows = load_rows_from(data, kw.pop("fmt", None))
    enc, why = encode_row(*fmt_rows, tok, template, settings(**kw))
    assert why is None
    return enc


def load_rows_from(data: dict, fmt: str | None):
    from sftlab.data.formats import detect_format

    row = Row(data, "mem.jsonl", 1)
    return (fmt or detect_format(set(data), "mem.jsonl")), row


ALPACA = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                              {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye."}]}
MESSAGES = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}]}
PROMPT_COMPLETION = {"prompt": "Capital of France?", "completion": "Paris"}
RQA = {"chat_history": [], "question": "Where is Zorbel?",
       "gold_docs": [{"page_content": "Zorbel is on Kestrin Isle.", "fmt_content": "",
                      "metadata": {"source": "atlas.md", "title": "Zorbel"}}],
       "gold_answer": "On Kestrin Isle."}


def test_alpaca_tokenizer_template_exact(smol_tokenizer):
    t = load_template(None, smol_tokenizer)
    enc = encode_one(smol_tokenizer, t, ALPACA)
    assert full_text(smol_tokenizer, enc) == (
        SMOL_SYSTEM + "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n")
    # The answer and the end-of-turn token are trained; the newline after it is not.
    assert trained_text(smol_tokenizer, enc) == "5<|im_end|>"
    assert enc.labels[-1] == IGNORE_INDEX and enc.labels[-2] == smol_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_sharegpt_multi_turn_completion_vs_last_turn_vs_all(smol_tokenizer):
    t = load_template("chatml", smol_tokenizer)
    enc = encode_one(smol_tokenizer, t, SHAREGPT)
    assert trained_text(smol_tokenizer, enc) == "Hello!<|im_end|>Goodbye.<|im_end|>"
    enc_last = encode_one(smol_tokenizer, t, SHAREGPT, train_on="last_turn")
    assert trained_text(smol_tokenizer, enc_last) == "Goodbye.<|im_end|>"
    enc_all = encode_one(smol_tokenizer, t, SHAREGPT, train_on="all")
    assert enc_all.labels == enc_all.input_ids
    assert full_text(smol_tokenizer, enc) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nGoodbye.<|im_end|>\n")


def test_messages_with_system_chatml(smol_tokenizer):
    t = load_template("chatml", smol_tokenizer)
    enc = encode_one(smol_tokenizer, t, MESSAGES)
    assert full_text(smol_tokenizer, enc).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert trained_text(smol_tokenizer, enc) == "Hello!<|im_end|>"


def test_prompt_completion_alpaca_template(smol_tokenizer):
    t = load_template("alpaca", smol_tokenizer)
    enc = encode_one(smol_tokenizer, t, PROMPT_COMPLETION)
    assert full_text(smol_tokenizer, enc) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nCapital of France?\n\n### Response:\nParis<|im_end|>\n\n")
    assert trained_text(smol_tokenizer, enc) == "Paris<|im_end|>"


def test_text_format_trains_everything_and_appends_eos(smol_tokenizer):
    t = load_template(None, smol_tokenizer)
    enc = encode_one(smol_tokenizer, t, {"text": "Once upon a time."})
    assert enc.labels == enc.input_ids
    assert full_text(smol_tokenizer, enc) == "Once upon a time.<|im_end|>"


def test_llama2_and_mistral_on_sentencepiece(sp_tokenizer):
    t = load_template("llama2", sp_tokenizer)
    msgs = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello there")]
    enc = encode_messages(sp_tokenizer, t, msgs)
    assert t.render(msgs).text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello there </s>"
    # SentencePiece folds the space before the answer into '▁Hello': that token is trained, not lost.
    assert trained_text(sp_tokenizer, enc).strip() == "Hello there </s>"
    first = next(i for i, l in enumerate(enc.labels) if l != IGNORE_INDEX)
    assert sp_tokenizer.convert_ids_to_tokens(enc.input_ids[first]).startswith("▁")
    t = load_template("mistral", sp_tokenizer)
    enc = encode_messages(sp_tokenizer, t, msgs[1:])
    assert t.render(msgs[1:]).text == "<s>[INST] Hi [/INST]Hello there</s>"
    assert trained_text(sp_tokenizer, enc).strip() == "Hello there</s>"


def test_localrqa_prefix_template_rule(sp_tokenizer):
    d = DataArguments(user_prefix="<s>[INST]", assistant_prefix="[/INST]", sep_user=" ", sep_sys="</s>")
    t = load_template(None, sp_tokenizer, data_args=d)
    msgs = [Message("user", "question"), Message("assistant", "answer")]
    assert t.render(msgs).text == "<s>[INST] question [/INST] answer</s>"
    enc = encode_messages(sp_tokenizer, t, msgs)
    assert trained_text(sp_tokenizer, enc).strip() == "answer</s>"
    assert t.render_prompt(msgs[:1]) == "<s>[INST] question [/INST] "


def test_rqa_row_trains_only_the_answer(smol_tokenizer):
    t = load_template("chatml", smol_tokenizer)
    enc = encode_one(smol_tokenizer, t, RQA)
    text = full_text(smol_tokenizer, enc)
    assert "Source: atlas.md\nTitle: Zorbel\nContent:\nZorbel is on Kestrin Isle." in text
    assert text.index("Zorbel is on Kestrin") < text.index("Question: Where is Zorbel?")
    assert trained_text(smol_tokenizer, enc) == "On Kestrin Isle.<|im_end|>"


def test_rqa_history_goes_between_passages_and_question(smol_tokenizer):
    row = dict(RQA, chat_history=[{"speaker": "user", "message": "Tell me about Zorbel", "source_documents": []},
                                  {"speaker": "assistant", "message": "It is a town.", "source_documents": []}])
    t = load_template("chatml", smol_tokenizer)
    enc = encode_one(smol_tokenizer, t, row)
    text = full_text(smol_tokenizer, enc)
    assert text.index("Content:") < text.index("User: Tell me about Zorbel") < text.index("Assistant: It is a town.") \
        < text.index("Question:")
    assert trained_text(smol_tokenizer, enc) == "On Kestrin Isle.<|im_end|>"


ALL_ROWS = [ALPACA, SHAREGPT, MESSAGES, PROMPT_COMPLETION, RQA,
            {"instruction": "Say hi", "output": "hi", "history": [["a", "b"], ["c", "d"]]}]


# The SentencePiece test tokenizer has no chat template of its own, so it is paired with the built-ins only.
TEMPLATE_TOKENIZER = [(t, "smol") for t in (None, "chatml", "llama2", "mistral", "alpaca", "plain", "prefix")] + \
    [(t, "sp") for t in ("chatml", "llama2", "mistral", "alpaca", "plain", "prefix")]


@pytest.mark.parametrize("template_name,tok_name", TEMPLATE_TOKENIZER)
@pytest.mark.parametrize("row", ALL_ROWS, ids=["alpaca", "sharegpt", "messages", "prompt_completion", "rqa", "history"])
def test_generation_prompt_is_a_prefix_of_training_ids(template_name, row, tok_name, smol_tokenizer, sp_tokenizer):
    """What the model gets at generation time tokenizes to exactly the start of the training example, and the
    rest of the example up to the end of the answer is trained."""
    tok = smol_tokenizer if tok_name == "smol" else sp_tokenizer
    if template_name == "prefix":
        d = DataArguments(user_prefix="<s>[INST]", assistant_prefix="[/INST]", sep_user=" ", sep_sys="</s>")
        t = load_template(None, tok, data_args=d)
    else:
        t = load_template(template_name, tok)
    fmt, r = load_rows_from(row, None)
    from sftlab.data.formats import to_messages

    msgs = to_messages(fmt, r, FormatOptions())
    enc = encode_messages(tok, t, msgs)
    prompt = encode_prompt(tok, t, msgs[:-1])
    assert enc.input_ids[: len(prompt)] == prompt
    # Every token after the prompt belongs to the final answer (trained), up to the end-of-turn marker.
    tail = enc.labels[len(prompt):]
    n_trained = sum(l != IGNORE_INDEX for l in tail)
    assert n_trained >= 1
    assert all(l != IGNORE_INDEX for l in tail[:n_trained])
    # Decoding the generation prompt plus the trained tail gives back the whole rendered conversation.
    assert tok.decode(enc.input_ids, skip_special_tokens=False).replace(" ", "") == \
        t.render(msgs).text.replace(" ", "")


def test_tokenizer_template_default_system_matches_apply_chat_template(smol_tokenizer):
    """The sandboxed rendering of the tokenizer's template equals transformers' apply_chat_template."""
    t = load_template(None, smol_tokenizer)
    msgs = [Message("user", "Hi"), Message("assistant", "Yo"), Message("user", "Again")]
    ref = smol_tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in msgs],
                                             tokenize=False, add_generation_prompt=True)
    assert t.render_prompt(msgs) == ref


def test_system_option_replaces_the_tokenizer_templates_default_and_survives_saving(smol_tokenizer, tmp_path):
    from sftlab.data.templates import load_saved_template, save_template

    t = load_template(None, smol_tokenizer, system="Be kind.")
    msgs = [Message("user", "Hi"), Message("assistant", "Hello")]
    text = t.render(msgs).text
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi")
    assert "SmolLM" not in text
    save_template(t, tmp_path)
    again = load_saved_template(tmp_path, smol_tokenizer)
    assert again.render(msgs).text == text and again.render_prompt(msgs[:1]) == t.render_prompt(msgs[:1])
    # A row's own system message wins over the default.
    assert t.render([Message("system", "Row system."), *msgs]).text.startswith("<|im_start|>system\nRow system.")
