"""The pre-training loop of `macrl-pretrain`: transformers' Trainer with MACRL's momentum branch, data and outputs.

`run_pretraining(PretrainingArguments(...))` runs the whole job (`run`: plan, build, train, finish); the modules hold
its parts: `arguments` (the run's flags), `plan` (every decision of the run, made once: config, device, processes,
workers, steps, precision; the `TrainingArguments`), `data` (what it trains on), `trainer` (the `Trainer`),
`callbacks` (and `RunCallbacks`, all of them in order), `checkpoints` (atomic saves, resume checks), `budget`
(`--max-minutes`), `knn_monitor`, `final_evaluation`, `pictures`, `release` (`encoder/` and the Hub push).
"""

from .arguments import PretrainingArguments
from .run import PretrainingError, run_pretraining

__all__ = ["PretrainingArguments", "PretrainingError", "run_pretraining"]
