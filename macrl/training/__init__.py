"""The pre-training loop of `macrl-pretrain`: transformers' Trainer with MACRL's momentum branch, data and outputs.

`run_pretraining(PretrainingArguments(...))` runs the whole job; the modules hold its parts: `arguments` (the run's
settings), `data` (what it trains on), `trainer` (the `Trainer` and its `TrainingArguments`), `callbacks`,
`checkpoints` (atomic saves, resume checks), `budget` (`--max-minutes`), `pictures`, `release` (`encoder/` and the
Hub push).
"""

from .arguments import PretrainingArguments
from .run import PretrainingError, run_pretraining

__all__ = ["PretrainingArguments", "PretrainingError", "run_pretraining"]
