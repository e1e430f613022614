"""`convcli prepare`: dialogue corpora into a shard directory for `train`."""

from __future__ import annotations

from collections import Counter

from convcli.cli.common import StageBars, info, progress_mode
from convcli.cli.options import QuietOption, settings_options
from convcli.data.prepare_settings import PrepareSettings


@settings_options(settings=PrepareSettings, config="prepare", arguments=("inputs",))
def prepare(settings: PrepareSettings, quiet: QuietOption = False) -> None:
    """Prepare dialogue corpora into shards for training.

    Tokenizes each dialogue in the conversation layout; windows long ones by whole turns.
    Splits train/valid by a hash of each dialogue (stable across runs).
    Writes memory-mapped shards, manifest.json, prepare.yaml and the tokenizer, atomically.

    \b
    Example:
      convcli prepare sample_data/dialogues.tsv -o shards \\
          --train-tokenizer --vocab-size 1000
    """
    from convcli.data.prepare import prepare as run

    label = {"tokenizer": "training tokenizer"}.get
    with StageBars(
        lambda stage: label(stage, "preparing"), mode=progress_mode(quiet),
        unit="B", unit_scale=True, unit_divisor=1024, leave=False,
    ) as bars:  # fmt: skip
        result = run(settings, bars)
    skipped = sum(result.skipped.values())
    reasons = ", ".join(f"{n} {reason}" for reason, n in result.skipped.items())
    split = ", ".join(f"{s} {d['examples']}" for s, d in result.splits.items())
    truncated = f", {result.truncated_turns} turns truncated" if result.truncated_turns else ""
    if result.same_role_turns:
        how = "joined" if settings.same_role == "join" else "kept apart"
        truncated += f", {result.same_role_turns} same-role turns {how}"
    read_as = Counter(result.formats.values())
    formats = ", ".join(f"{n} {f}" if len(result.formats) > 1 else f for f, n in read_as.items())
    info(
        f"prepared {result.output}: {result.dialogues_read} dialogues read, "
        f"{result.dialogues_written} written, {skipped} skipped{f' ({reasons})' if reasons else ''}"
        f"{truncated}; {result.examples} examples ({split}), {result.tokens} tokens "
        f"in {result.seconds:.1f}s; read as {formats}"
    )
