"""`convcli convert`: a thin face on `convcli.conversion.convert.convert_checkpoint`."""

from __future__ import annotations

import dataclasses
import re

from convcli.cli.common import StageBars, info, progress_mode
from convcli.cli.options import QuietOption, settings_options
from convcli.conversion.settings import ConvertSettings
from convcli.errors import UsageError

CONFIG_FILE = "convert.yaml"


@settings_options(settings=ConvertSettings, config="convert", arguments=("checkpoint",))
def convert(settings: ConvertSettings, quiet: QuietOption = False) -> None:
    """Convert a DialoGPT .pkl or a train .ckpt into a verified model folder.

    The size comes from the tensors (file names lie); no code in the file runs.

    The folder is loaded back with plain transformers and its logits compared;
    the resolved settings are written into it as convert.yaml.

    \b
    Example:
      convcli convert medium_ft.pkl -o dialogpt-medium \\
          --tokenizer gpt2-vocab/
    """
    from convcli.conversion.convert import convert_checkpoint
    from convcli.inference.loading import set_threads
    from convcli.settings import to_yaml

    s = settings
    if s.checkpoint is None:
        raise UsageError("give the CHECKPOINT to convert (a .pkl or a .ckpt)")
    if s.output is None:
        raise UsageError("--output is required: the model folder to write")
    options = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    del options["checkpoint"], options["output"]
    config = to_yaml(s, header="convcli convert: the resolved settings of this folder")
    # Verification runs the model: as many torch threads as generate uses (on a busy
    # machine, threads that wait for each other at every op cost more than they give).
    set_threads(None)
    bars = StageBars(label=lambda stage: f"{stage:<7}", mode=progress_mode(quiet), leave=True)
    with bars:
        report = convert_checkpoint(
            s.checkpoint, s.output, progress=bars, extra_files={CONFIG_FILE: config}, **options
        )
    if report.dropped:
        info(f"dropped {len(report.dropped)} keys: {_dropped(report.dropped)}")
    for note in report.notes:
        info(f"note: {note}")
    info(report.summary())


def _dropped(keys: list[str]) -> str:
    buffers = [k for k in keys if re.search(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$", k)]
    others = [k for k in keys if k not in buffers]
    parts = [f"{len(buffers)} causal-mask buffers (h.*.attn.bias/masked_bias)"] if buffers else []
    return ", ".join(parts + others)
