"""`convcli train`: fine-tune or train a conversation model from shards (Lightning)."""

from __future__ import annotations

from convcli.cli.common import info
from convcli.cli.options import settings_options
from convcli.training.settings import TrainSettings


@settings_options(settings=TrainSettings, config="train")
def train(settings: TrainSettings) -> None:
    """Fine-tune a model (or train one from a preset) on prepared shards.

    Writes RUN_DIR/final/ and RUN_DIR/best/ (Hugging Face folders), checkpoints and logs.

    \b
    Examples:
      convcli train -d shards/ --preset tiny -o runs/tiny --max-steps 300
      convcli train --print-config > train.yaml
      convcli train --config train.yaml --resume auto
    """
    from convcli.training.fit import train as run

    result = run(settings, report=info)
    if not result.is_global_zero:
        return
    val = (
        f"val loss {result.val_loss:.4f} (ppl {result.val_ppl:.2f})"
        if result.val_loss is not None
        else "no validation split"
    )
    best = f", best: {result.best}" if result.best else ""
    info(
        f"trained {result.steps} steps on {result.tokens:,} tokens in {result.seconds:.1f} s; "
        f"{val}; final: {result.final}{best}"
    )
