"""convcli: train and talk to GPT-2-style conversation models.

The public API is imported lazily so that `import convcli` (and `convcli --help`)
stays fast: torch and transformers load only when a class is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ConversationModel", "ConversationTokenizer", "__version__"]

if TYPE_CHECKING:
    from convcli.inference.model import ConversationModel
    from convcli.tokenizer import ConversationTokenizer

_LAZY = {
    "ConversationTokenizer": "convcli.tokenizer",
    "ConversationModel": "convcli.inference.model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'convcli' has no attribute {name!r}")
