"""Parquet, Arrow and Hugging Face dataset folders (written here with pyarrow, as
`datasets.save_to_disk` writes them: Arrow stream files, state.json, dataset_info.json)."""

from __future__ import annotations

import json
import sys

import pytest

from convcli.data.prepare import PrepareSettings, prepare
from convcli.data.readers import Corpus, Dialogue, ReadOptions, parse_chunk
from convcli.errors import ConvcliError, InputError

pa = pytest.importorskip("pyarrow", reason="pyarrow (the arrow extra) is not installed")
import pyarrow.parquet as pq  # noqa: E402

MESSAGES = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi there"}],
    [{"role": "user", "content": "Tea?"}, {"role": "assistant", "content": "Yes please"}],
    [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}],
]  # fmt: skip


def messages_table(rows=MESSAGES, **extra):
    return pa.table({"id": list(range(len(rows))), "messages": rows, **extra})


def summary(got):
    return [
        (r.turns, r.roles, r.line) if isinstance(r, Dialogue) else (r.reason, r.line, r.unit)
        for r in got
    ]


def test_parquet_with_a_list_of_structs_column(tmp_path):
    path = tmp_path / "chat.parquet"
    pq.write_table(messages_table(), path, row_group_size=2)
    corpus = Corpus([str(path)])
    assert corpus.formats == {str(path): "parquet"}
    got = list(corpus)
    assert summary(got) == [
        (["Be brief.", "Hello", "Hi there"], ["system", "user", "assistant"], 1),
        (["Tea?", "Yes please"], ["user", "assistant"], 2),
        ("unknown-role", 3, "row"),
    ]
    assert str(got[2].error()).startswith(f"{path}:row 3: message 2: unknown role 'robot'")
    for size in (1, 256, 1 << 20):  # rows per chunk: 1, 1, all
        again = [r for c in Corpus([str(path)]).chunks(size) for r in parse_chunk(c)]
        assert again == got


def test_dailydialog_lists_of_strings_and_a_named_field(tmp_path):
    path = tmp_path / "dd.parquet"
    table = pa.table({"dialog": [["Hi", "Hello"], ["Alone"]], "act": [[1, 2], [3]]})
    pq.write_table(table, path)
    assert summary(list(Corpus([str(path)]))) == [
        (["Hi", "Hello"], None, 1),
        ("one-turn", 2, "row"),
    ]
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"utterances": [["a", "b"]], "n": [1]}), other)
    (bad,) = Corpus([str(other)])
    assert bad.reason == "no-field"
    assert str(bad.error()) == (
        f"{other}: no column of turns (looked for messages, conversations, dialog, dialogue, "
        "turns, conversation; columns: utterances, n); name it with `field`"
    )
    (good,) = Corpus([str(other)], options=ReadOptions(field="utterances"))
    assert good.turns == ["a", "b"]


def save_to_disk(folder, table, split="train", files=2):
    """What `Dataset.save_to_disk` writes: Arrow *stream* files, state.json, dataset_info.json."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{files:05d}.arrow" for i in range(files)]
    step = -(-table.num_rows // files)
    for i, name in enumerate(names):
        with (
            pa.OSFile(str(folder / name), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as writer,
        ):
            for batch in table.slice(i * step, step).to_batches(max_chunksize=1):
                writer.write_batch(batch)
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0" * 16,
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
        "_output_all_columns": False, "_split": split,
    }))  # fmt: skip
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}, "splits": {}}))
    return folder


def test_a_save_to_disk_folder_and_a_dataset_dict_with_splits(tmp_path):
    convos = [[{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]
              for i in range(4)]  # fmt: skip
    folder = save_to_disk(tmp_path / "ds", pa.table({"conversations": convos}))
    corpus = Corpus([str(folder)])
    assert corpus.formats == {str(folder): "hf-dataset"}
    got = list(corpus)
    assert [(d.turns, d.roles, d.line, d.source.rsplit("/", 1)[1]) for d in got] == [
        (["q0", "a0"], ["user", "assistant"], 1, "data-00000-of-00002.arrow"),
        (["q1", "a1"], ["user", "assistant"], 2, "data-00000-of-00002.arrow"),
        (["q2", "a2"], ["user", "assistant"], 1, "data-00001-of-00002.arrow"),
        (["q3", "a3"], ["user", "assistant"], 2, "data-00001-of-00002.arrow"),
    ]
    both = tmp_path / "dict"
    save_to_disk(both / "train", pa.table({"dialog": [["t1", "t2"]]}))
    save_to_disk(both / "test", pa.table({"dialog": [["e1", "e2"]]}), split="test", files=1)
    (both / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert [d.turns for d in Corpus([str(both)])] == [["t1", "t2"]]
    test = Corpus([str(both)], options=ReadOptions(split="test"))
    assert [d.turns for d in test] == [["e1", "e2"]]
    with pytest.raises(InputError, match=r"dict: no split 'dev'; its splits: train, test"):
        list(Corpus([str(both)], options=ReadOptions(split="dev")))


def test_arrow_ipc_file_format(tmp_path):
    path = tmp_path / "chat.arrow"
    with pa.ipc.new_file(str(path), messages_table().schema) as writer:
        writer.write_table(messages_table(MESSAGES[:2]))
    assert [d.turns[-1] for d in Corpus([str(path)])] == ["Hi there", "Yes please"]


def test_prepare_from_parquet_counts_bad_rows(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "chat.parquet"
    pq.write_table(messages_table(), path)
    settings = PrepareSettings(
        inputs=[str(path)], output=tmp_path / "out", tokenizer=str(tiny_tokenizer_dir), workers=2,
    )  # fmt: skip
    with pytest.raises(InputError, match=r"chat\.parquet:row 3: message 2: unknown role"):
        prepare(settings)
    settings.on_error = "skip"
    result = prepare(settings)
    assert result.dialogues_read == 3 and result.dialogues_written == 2
    assert result.skipped == {"unknown-role": 1}
    assert result.formats == {str(path): "parquet"}


def test_without_pyarrow_a_one_line_install_hint(tmp_path, monkeypatch):
    path = tmp_path / "chat.parquet"
    pq.write_table(messages_table(), path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    with pytest.raises(ConvcliError) as caught:
        Corpus([str(path)])
    assert (
        str(caught.value) == "reading Parquet and Arrow needs pyarrow: pip install 'convcli[arrow]'"
    )


def test_a_file_that_is_no_table_is_one_unreadable_record(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('["a", "b"]\n')
    (bad,) = Corpus([str(path)], format="parquet")
    assert bad.reason == "unreadable"
    assert str(bad.error()).startswith(f"{path}: cannot read as parquet: ")


def test_empty_tables_and_rows_without_turns_are_counted(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(messages_table([]), empty)
    (bad,) = Corpus([str(empty)])
    assert (bad.reason, str(bad.error())) == ("empty-file", f"{empty}: empty table (no rows)")
    holes = tmp_path / "holes.parquet"
    pq.write_table(pa.table({"dialog": [["a", "b"], None, ["c", ""]]}), holes)
    got = list(Corpus([str(holes)]))
    assert summary(got) == [
        (["a", "b"], None, 1), ("not-turns", 2, "row"), ("empty-turn", 3, "row"),
    ]  # fmt: skip
    assert str(got[1].error()) == (
        f"{holes}:row 2: expected a list of strings or of {{role, content}} / {{from, value}} items"
    )


def test_the_cli_names_the_split_option(tmp_path, tiny_tokenizer_dir):
    from typer.testing import CliRunner

    from convcli.cli.app import app

    both = tmp_path / "dict"
    save_to_disk(both / "train", pa.table({"dialog": [["t1", "t2"]]}))
    (both / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    args = ["prepare", str(both), "-o", str(tmp_path / "o"), "--tokenizer", str(tiny_tokenizer_dir)]
    result = CliRunner().invoke(app, [*args, "--split", "dev"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: {both}: no split 'dev'; its splits: train (choose one with --split)"
    )
    result = CliRunner().invoke(app, [*args, "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().endswith("; read as hf-dataset")


def test_a_dataset_folder_that_cannot_be_read_is_refused_before_any_work(tmp_path):
    folder = save_to_disk(tmp_path / "ds", pa.table({"dialog": [["a", "b"]]}))
    (folder / "state.json").write_text('{"_split": "train"}')
    with pytest.raises(InputError) as caught:
        Corpus([str(folder)])
    assert str(caught.value) == f"{folder}: not a saved dataset: state.json: no key '_data_files'"
