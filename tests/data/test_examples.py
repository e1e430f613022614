"""Labels of known examples: which tokens carry loss for each --train-on, and --reverse."""

from __future__ import annotations

import numpy as np
import pytest

from convcli.data.shards import Shards
from convcli.training.datamodule import IGNORE, Collate, TrainingExamples

DIALOGUE = ["Hello", "Hi, how are you?", "I am fine, thank you."]
X = IGNORE


def example(shards, **options):
    dataset = TrainingExamples(shards, "train", 0, **options)
    return dataset[(0, True)]


@pytest.fixture
def turns(tiny_tokenizer):
    assert tiny_tokenizer.sep_token_id == 0
    return tiny_tokenizer.encode_turns(DIALOGUE)


def ignored(tokens):
    return [X] * len(tokens)


def test_responses_only_labels_are_exact(make_shards, turns):
    a, b, c = turns
    got = example(make_shards([DIALOGUE], valid_every=0))
    assert got["input_ids"].tolist() == [0, *a, 0, *b, 0, *c, 0]
    assert got["labels"].tolist() == [X, *ignored(a), X, *b, 0, *c, 0]
    assert got["token_type_ids"].tolist() == [0] * (len(a) + 1) + [1] * (len(b) + 1) + [0] * (
        len(c) + 1
    ) + [1]


def test_all_trains_every_token_but_the_first(make_shards, turns):
    a, b, c = turns
    got = example(make_shards([DIALOGUE], valid_every=0), train_on="all")
    assert got["labels"].tolist() == [X, *a, 0, *b, 0, *c, 0]


def test_weights_follow_the_tsv_weights(make_shards, turns):
    a, b, c = turns
    shards = make_shards([DIALOGUE], valid_every=0, weights=[[True, False, True]])
    got = example(shards, train_on="weights")
    assert got["labels"].tolist() == [X, *a, 0, *ignored(b), X, *c, 0]


def test_reverse_reverses_turns_and_keeps_weights(make_shards, turns):
    a, b, c = turns
    shards = make_shards([DIALOGUE], valid_every=0, weights=[[True, False, True]])
    got = example(shards, reverse=True)
    assert got["input_ids"].tolist() == [0, *c, 0, *b, 0, *a, 0]
    assert got["labels"].tolist() == [X, *ignored(c), X, *b, 0, *a, 0]
    assert got["token_type_ids"][: len(c) + 2].tolist() == [0] * (len(c) + 1) + [1]
    weighted = example(shards, reverse=True, train_on="weights")
    assert weighted["labels"].tolist() == [X, *c, 0, *ignored(b), X, *a, 0]


def test_truncation_drops_oldest_turns_and_their_loss(make_shards, turns):
    _, b, c = turns
    limit = len(b) + len(c) + 3
    got = example(make_shards([DIALOGUE], valid_every=0), max_length=limit)
    assert got["input_ids"].tolist() == [0, *b, 0, *c, 0]
    # b is now the first turn: the context, not a response
    assert got["labels"].tolist() == [X, *ignored(b), X, *c, 0]


def test_collate_pads_dynamically_and_masks_padding(make_shards):
    shards = make_shards([DIALOGUE, ["Hi", "Yo"]], valid_every=0)
    dataset = TrainingExamples(shards, "train", 0)
    items = [dataset[(0, True)], dataset[(1, False)]]
    batch = Collate(pad_id=0, token_types=False)(items)
    width = len(items[0]["input_ids"])
    assert batch["input_ids"].shape == (2, width) and "token_type_ids" not in batch
    short = len(items[1]["input_ids"])
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (width - short)
    assert (batch["labels"][1] == X).all()  # uncounted filler: no loss at all
    assert Collate(0, True)(items)["token_type_ids"].shape == (2, width)


def test_dataset_reads_lazily_and_pickles_without_data(make_shards):
    import pickle

    shards = make_shards()
    dataset = TrainingExamples(shards, "train", 0, max_length=8)
    assert dataset.lengths().max() <= 8
    assert np.array_equal(dataset.split.lengths(), Shards(shards).split("train").lengths())
    assert len(pickle.dumps(dataset)) < 2000


def test_roles_still_decide_the_labels_when_training_cuts_old_turns(tmp_path, tiny_tokenizer_dir):
    """A context shorter than prepare's cuts the oldest turns; the user's turns stay
    untrained (they are no replies by role), as in the prepared example."""
    import json

    from convcli.data.prepare import PrepareSettings, prepare
    from convcli.tokenizer import ConversationTokenizer

    roles = ["user", "assistant", "user", "assistant"]
    texts = ["Hello", "Hi, how are you?", "Do you like tea?", "I am fine, thank you."]
    source = tmp_path / "chat.jsonl"
    messages = [{"role": r, "content": t} for r, t in zip(roles, texts, strict=True)]
    source.write_text(json.dumps({"messages": messages}) + "\n")
    out = tmp_path / "shards"
    prepare(PrepareSettings(inputs=[str(source)], output=out, tokenizer=str(tiny_tokenizer_dir),
                            workers=1, valid_fraction=0.0))  # fmt: skip
    tokenizer = ConversationTokenizer.from_pretrained(tiny_tokenizer_dir)
    a, b, c, d = tokenizer.encode_turns(texts)
    whole = example(out)
    assert whole["labels"].tolist() == [X, *ignored(a), X, *b, 0, *ignored(c), X, *d, 0]
    cut = example(out, max_length=len(b) + len(c) + len(d) + 4)  # the first turn goes
    assert cut["input_ids"].tolist() == [0, *b, 0, *c, 0, *d, 0]
    # The assistant turn left first has no context: no reply, as the first turn ever is.
    assert cut["labels"].tolist() == [X, *ignored(b), X, *ignored(c), X, *d, 0]
