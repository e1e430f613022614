"""End-to-end training on tiny models (2 layers, 64 wide), in process."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from convcli.errors import ConvcliError
from convcli.training.fit import PRESETS, train
from convcli.training.settings import TrainSettings


def settings(data: Path, output: Path, **overrides) -> TrainSettings:
    base = {
        "data": data, "output": output, "batch_size": 4, "learning_rate": 1e-3,
        "warmup_steps": 2, "val_every": 5, "save_every": 100, "max_steps": 10,
        "accelerator": "cpu", "devices": "1",
    }  # fmt: skip
    return TrainSettings(**{**base, **overrides})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def val_losses(run: Path) -> list[float]:
    rows = csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open())
    return [float(r["val_loss"]) for r in rows if r.get("val_loss")]


@pytest.mark.slow
def test_loss_falls_and_final_loads_with_plain_transformers(make_shards, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    result = train(settings(make_shards(), run, model=str(tiny_model_dir), max_steps=20),
                   progress=False)  # fmt: skip
    losses = val_losses(run)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5
    assert result.steps == 20 and result.val_loss == pytest.approx(losses[-1])
    assert result.tokens > 0 and 0 <= result.padding < 0.5

    final = run / "final"
    assert (final / "train.yaml").is_file() and (run / "train.yaml").is_file()
    meta = json.loads((final / "convcli.json").read_text())
    assert meta["made_by"] == "train" and meta["token_types"] is True  # as the base folder
    assert meta["reverse"] is False and meta["extra"]["step"] == 20
    assert (run / "best" / "model.safetensors").is_file()

    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    prompt = tokenizer("Hello", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert model.generation_config.eos_token_id == meta["sep_token_id"]


class Crash(pl.Callback):
    """Simulates a killed run: dies after optimizer step `at`."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


@pytest.mark.slow
def test_resume_after_a_crash_matches_an_uninterrupted_run(make_shards, tiny_model_dir, tmp_path):
    shards = make_shards()  # 20 training examples / 4 = 5 batches per epoch
    common = {"model": str(tiny_model_dir), "max_steps": 12, "save_every": 3, "val_every": 4}
    straight = train(settings(shards, tmp_path / "a", **common), progress=False)

    crashed = settings(shards, tmp_path / "b", **common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, callbacks=[Crash(at=7)], progress=False)
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["step-0000003.ckpt", "step-0000006.ckpt"]  # step 6: mid epoch 2
    resumed = train(settings(shards, tmp_path / "b", resume="auto", **common), progress=False)

    assert resumed.steps == straight.steps == 12
    assert resumed.tokens == straight.tokens
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert resumed.val_loss == pytest.approx(straight.val_loss, rel=1e-5)


@pytest.mark.slow
def test_preset_reverse_and_resized_vocabulary(make_shards, tiny_tokenizer_dir, tmp_path):
    # Shards whose tokenizer adds <sep> to the model's: the embeddings grow by one row.
    from convcli.modelfolder import ModelMeta, save_model_folder
    from convcli.tokenizer import ConversationTokenizer, load_hf_tokenizer
    from tests.conftest import tiny_gpt2

    base = ConversationTokenizer.from_pretrained(tiny_tokenizer_dir)
    model_dir = save_model_folder(
        tiny_gpt2(len(base)), base, ModelMeta(token_types=False, sep_token_id=0), tmp_path / "m"
    )
    bigger = load_hf_tokenizer(tiny_tokenizer_dir)
    bigger.add_special_tokens({"sep_token": "<sep>"})
    bigger.save_pretrained(str(tmp_path / "tok"))
    shards = make_shards(tokenizer_dir=tmp_path / "tok")

    run = tmp_path / "rev"
    train(settings(shards, run, model=str(model_dir), reverse=True, max_steps=2), progress=False)
    meta = json.loads((run / "final" / "convcli.json").read_text())
    assert meta["reverse"] is True and meta["token_types"] is False
    assert meta["sep_token_id"] == len(base)  # the added <sep>
    assert weights(run / "final")["transformer.wte.weight"].shape[0] == len(base) + 1


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step(make_shards, tiny_tokenizer_dir, tmp_path):
    from convcli.modelfolder import ModelMeta, save_model_folder
    from convcli.tokenizer import ConversationTokenizer
    from tests.conftest import tiny_gpt2

    tokenizer = ConversationTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = tiny_gpt2(len(tokenizer))
    with torch.no_grad():
        model.transformer.wte.weight.fill_(float("nan"))
    folder = save_model_folder(model, tokenizer, ModelMeta(True, 0), tmp_path / "nan")
    with pytest.raises(ConvcliError, match=r"the loss is nan at step 1"):
        train(settings(make_shards(), tmp_path / "run", model=str(folder)), progress=False)


def test_foreign_tokenizer_is_refused(make_shards, tiny_model_dir, tmp_path):
    from convcli.data.vocab import train_bpe_tokenizer

    other = train_bpe_tokenizer(["completely different text"] * 5, vocab_size=300)
    other.save_pretrained(str(tmp_path / "other"))
    shards = make_shards(tokenizer_dir=tmp_path / "other")
    with pytest.raises(ConvcliError, match="prepared with a different tokenizer"):
        train(settings(shards, tmp_path / "run", model=str(tiny_model_dir)), progress=False)


@pytest.mark.slow
def test_preset_without_validation_split_and_checkpoint_contents(make_shards, tmp_path):
    from convcli.training.module import ConversationLM

    run = tmp_path / "tiny"
    result = train(settings(make_shards(valid_every=0), run, preset="tiny", max_steps=2),
                   progress=False)  # fmt: skip
    assert result.val_loss is None and result.best is None and not (run / "best").exists()
    meta = json.loads((run / "final" / "convcli.json").read_text())
    assert meta["source"] == "preset:tiny" and meta["token_types"] is True

    # The checkpoint rebuilds without the run: `model.<hf key>` weights + hyper_parameters.
    ckpt = torch.load(run / "checkpoints" / "step-0000002.ckpt", weights_only=False)
    assert all(key.startswith("model.") for key in ckpt["state_dict"])
    hparams = ckpt["hyper_parameters"]
    assert hparams["config"]["n_layer"] == PRESETS["tiny"]["n_layer"]
    assert hparams["config"]["resid_pdrop"] == 0.0 and hparams["settings"]["preset"] == "tiny"
    assert hparams["meta"]["token_types"] is True and ckpt["optimizer_states"]
    module = ConversationLM.load_from_checkpoint(run / "checkpoints" / "step-0000002.ckpt")
    final = weights(run / "final")
    torch.testing.assert_close(module.model.transformer.wpe.weight, final["transformer.wpe.weight"])


# Training dialogues a tiny model memorises, and validation dialogues unlike them: the
# validation loss falls for a few steps, then rises for good (overfitting, on purpose).
UNLIKE = [["The weather is cold today.", "Take a coat then."],
          ["Trains run late on Sunday.", "Walk instead."],
          ["Cats sleep all day long.", "Dogs do too."]]  # fmt: skip


def overfitting_shards(make_shards) -> Path:
    from tests.conftest import DIALOGUES

    unique = list(dict.fromkeys(tuple(d) for d in DIALOGUES))
    mixed = [UNLIKE[(i // 5) % 3] if i % 5 == 4 else unique[i % len(unique)] for i in range(15)]
    return make_shards(mixed)  # every 5th dialogue is validation: the unlike ones


@pytest.mark.slow
def test_early_stop_ends_the_run_and_best_holds_the_best_step(make_shards, tmp_path):
    run = tmp_path / "run"
    lines: list[str] = []
    s = settings(overfitting_shards(make_shards), run, preset="tiny", max_steps=60,
                 learning_rate=None, warmup_steps=None, early_stop=2)  # fmt: skip
    result = train(s, report=lines.append, progress=False)

    losses = val_losses(run)
    best_at = 5 * (losses.index(min(losses)) + 1)
    assert result.stopped_early and result.best_step == best_at
    assert result.steps == best_at + 2 * 5 < 60  # two worse validations, 5 steps apart
    assert result.worse_since_best == 2 and result.best_val_loss == pytest.approx(min(losses))
    best = json.loads((run / "best" / "convcli.json").read_text())
    assert best["extra"]["step"] == best_at
    # Defaults by starting point, printed; and the corpus is far too small for the model.
    assert any(line.startswith("learning rate 0.003, warmup 6 of 60 steps") for line in lines)
    assert any("tokens per parameter" in line and "`model` gpt2" in line for line in lines)


def test_early_stop_needs_a_validation_split(make_shards, tmp_path):
    s = settings(make_shards(valid_every=0), tmp_path / "run", preset="tiny", early_stop=2)
    with pytest.raises(ConvcliError, match="`early_stop` needs a validation split"):
        train(s, progress=False)


@pytest.mark.parametrize(
    ("lr", "warmup", "preset", "total", "expected"),
    [
        (None, None, None, 150, (1e-4, 15)),  # fine-tuning, 10% warmup
        (None, None, "tiny", 5000, (3e-3, 100)),  # from scratch; warmup capped
        (None, None, "small", 3, (6e-4, 1)),
        (2e-5, 7, "tiny", 150, (2e-5, 7)),  # given values win
    ],
)
def test_schedule_defaults_by_starting_point_and_run_length(lr, warmup, preset, total, expected):
    from convcli.training.schedule import choose_schedule

    chosen = choose_schedule(lr, warmup, preset, total)
    assert (chosen.learning_rate, chosen.warmup_steps) == expected
    assert ("default" in chosen.describe()) == (lr is None)


NAMES = ["Anna", "Ben", "Carl", "Dora", "Eve", "Finn", "Gus", "Hana", "Ivan", "Jane", "Kai",
         "Lena", "Max", "Nora", "Omar", "Pia"]  # fmt: skip
FOODS = ["tea", "rice", "bread", "soup", "fish", "cake", "apples", "pasta"]


@pytest.mark.slow
def test_a_short_tiny_run_with_default_settings_learns_a_regular_corpus(tmp_path):
    # Replies that follow from the message (names and foods copied into templates): a model
    # that learns predicts held-out replies it never saw. Measured: 0.09 with these defaults
    # (ln V = 5.7); 2.09, above ln V / 3, with the old ones (peak lr 1e-4, 100 warmup steps).
    import math

    from convcli.data.prepare import prepare
    from convcli.data.prepare_settings import PrepareSettings

    dialogues = [[f"Hello, I am {n}.", f"Nice to meet you, {n}."] for n in NAMES]
    dialogues += [
        [f"Do you like {f}, {n}?", f"Yes, {n}, I like {f}."] for n in NAMES for f in FOODS
    ]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"turns": d}) + "\n" for d in dialogues))
    shards = tmp_path / "shards"
    prepare(PrepareSettings(inputs=[str(corpus)], output=shards, train_tokenizer=True,
                            vocab_size=300, valid_fraction=0.1, workers=1))  # fmt: skip
    vocab = len(json.loads((shards / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])

    s = TrainSettings(data=shards, output=tmp_path / "run", preset="tiny", max_steps=150,
                      batch_tokens=256, val_every=150, accelerator="cpu", devices="1")  # fmt: skip
    result = train(s, progress=False)
    assert result.schedule is not None and result.schedule.learning_rate == 3e-3
    assert result.val_loss is not None and result.val_loss < math.log(vocab) / 3 / 2


class ThreadsSeen(pl.Callback):
    def __init__(self) -> None:
        self.seen: set[int] = set()

    def on_train_batch_start(self, *args) -> None:
        self.seen.add(torch.get_num_threads())


def test_threads_apply_during_training_and_are_restored(make_shards, tiny_model_dir, tmp_path):
    before = torch.get_num_threads()
    seen = ThreadsSeen()
    s = settings(make_shards(), tmp_path / "run", model=str(tiny_model_dir), max_steps=2, threads=1)
    train(s, callbacks=[seen], progress=False)
    assert seen.seen == {1} and torch.get_num_threads() == before
