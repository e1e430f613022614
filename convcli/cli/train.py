"""`convcli train`: fine-tune or train a conversation model from shards (Lightning)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from convcli.cli.common import info, progress_mode
from convcli.cli.options import QuietOption, settings_options, with_flags
from convcli.training.settings import TrainSettings

if TYPE_CHECKING:
    from convcli.training.fit import TrainResult


def report(line: str) -> None:
    """The core's progress lines, with parameter names shown as flags."""
    info(with_flags(line))


@settings_options(settings=TrainSettings, config="train")
def train(settings: TrainSettings, quiet: QuietOption = False) -> None:
    """Fine-tune a model (or train one from a preset) on prepared shards.

    Writes RUN_DIR/final/ and RUN_DIR/best/ (Hugging Face folders), checkpoints and logs.

    \b
    Examples:
      convcli train -d shards/ --preset tiny -o runs/tiny --max-steps 300
      convcli train -d shards/ --model gpt2 -o runs/ft --early-stop 3
      convcli train --print-config > train.yaml
      convcli train --config train.yaml --resume auto
    """
    from convcli.training.fit import train as run

    result = run(settings, report=report, progress=progress_mode(quiet))
    if result.is_global_zero:
        for line in summary(result):
            info(line)


def summary(result: TrainResult) -> list[str]:
    """The closing lines: what was produced, and whether validation stopped improving."""
    val = (
        f"val loss {result.val_loss:.4f} (ppl {result.val_ppl:.2f})"
        if result.val_loss is not None
        else "no validation split"
    )
    lines = [
        f"trained {result.steps} steps on {result.tokens:,} tokens in {result.seconds:.1f} s; "
        f"{val}; final: {result.final}"
    ]
    if result.best is None or result.best_step is None or result.best_val_loss is None:
        return lines
    loss = result.best_val_loss
    best = f"best: {result.best} holds step {result.best_step} (val loss {loss:.4f})"
    if result.stopped_early:
        lines.append(
            f"stopped early at step {result.steps}: the validation loss had not improved for "
            f"{result.worse_since_best} validations since step {result.best_step}; {best}"
        )
    elif result.worse_since_best:
        lines.append(
            f"the validation loss stopped improving at step {result.best_step} (the "
            f"{result.worse_since_best} validations since were worse: overfitting?); {best}; "
            "--early-stop N ends such a run sooner"
        )
    else:
        lines.append(best)
    return lines
