"""A second live quality signal during pre-training: a linear classifier trained alongside the encoder on its
detached features (solo-learn's online linear probe, `macrl-pretrain --online-probe`)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data import ImageSource, UnreadableImageError
from ..errors import first_line
from ..evaluation.frozen_features import extract_pooled_features
from ..image_processing_macrl import MACRLImageProcessor
from .checkpoints import CheckpointError
from .knn_monitor import monitor_queries

logger = logging.getLogger(__name__)

__all__ = ["ONLINE_PROBE_FILE", "OnlineProbe"]

# the probe's file in every checkpoint: its weights, its optimiser's state, and (metadata) its optimiser's settings
ONLINE_PROBE_FILE = "online_probe.safetensors"
# its AdamW's (no weight decay): 1e-2 read higher but swung by 20 points between evaluations
# (benchmarks/results/online-probe.md)
PROBE_LEARNING_RATE = 1e-3


class OnlineProbe(TrainerCallback):
    """A linear classifier on the encoder's pooled feature, trained at every step on the training batch's detached
    features (`train_step`, which `MACRLPretrainer.compute_loss` calls with the batch's labels) by an AdamW of its
    own, so it never changes the encoder's gradients, parameters or random numbers.

    Every `every` steps and at the last one, its accuracy on the monitor's fixed held-out images
    (`knn_monitor.monitor_queries`) waits in `pending` with the mean training loss since the last log, for the
    trainer's next log (which this forces): the JSONL log, the trackers and the plots; `train_seconds` and
    `eval_seconds` count what training and evaluating it cost. It trains and is evaluated on the main process only.
    Its state goes into every checkpoint (`ONLINE_PROBE_FILE`) and comes back with `load` when a run resumes; it is
    not part of the released encoder.

    The training features are those the loss is computed from, as solo-learn's MAE takes them: the pooled output of
    the masked strong view. The held-out images are encoded whole, as a user of the encoder encodes them, so its
    accuracy trails that of a linear probe fitted on whole images: a trend beside the kNN monitor's, free of any
    extra forward pass.
    """

    def __init__(
        self,
        processor: MACRLImageProcessor,
        eval_source: ImageSource,
        *,
        hidden_size: int,
        num_classes: int,
        every: int,
        images: int,
        device: torch.device,
        lr: float = PROBE_LEARNING_RATE,
        batch_size: int = 256,
        skip_unreadable: bool = False,
    ):
        self.processor = processor
        self.queries = monitor_queries(eval_source, images)
        self.every = every
        self.device = device
        self.batch_size = batch_size
        self.skip_unreadable = skip_unreadable
        self.classifier = nn.Linear(hidden_size, num_classes, device=device)
        # zeros: no draw from the run's random numbers (a softmax regression needs no symmetry breaking)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.optimizer = torch.optim.AdamW(self.classifier.parameters(), lr=lr, weight_decay=0.0)
        self.off = False
        self.pending: dict[str, float] = {}
        self.train_seconds = 0.0  # its training steps
        self.eval_seconds = 0.0  # its evaluations
        self.last: float | None = None
        self._losses: list[torch.Tensor] = []

    def train_step(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """One optimiser step of the classifier on `features` `[N, D]` (detached here) and their `labels` `[N]`."""
        started = time.monotonic()
        # float32 whatever the run's autocast; a graph of its own, from a detached input
        with torch.autocast(features.device.type, enabled=False), torch.enable_grad():
            logits = self.classifier(features.detach().float().to(self.device))  # [N, C]
            loss = F.cross_entropy(logits, labels.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._losses.append(loss.detach())
        self.train_seconds += time.monotonic() - started

    def on_step_end(self, args, state, control, model=None, **kwargs):
        last = state.global_step >= state.max_steps or control.should_training_stop
        if self.off or not state.is_world_process_zero or not (state.global_step % self.every == 0 or last):
            return
        started = time.monotonic()
        try:
            self.last = self.accuracy(model)
        except UnreadableImageError as error:
            self.off = True
            logger.warning("the online probe is off: %s (--skip-unreadable skips such images)", first_line(error))
            return
        finally:
            self.eval_seconds += time.monotonic() - started
        self.pending["online_probe_accuracy"] = self.last
        control.should_log = True

    def accuracy(self, model) -> float:
        """The classifier's accuracy (percent) on the held-out images, encoded by `model.macrl` as it is now."""
        was_training = model.training
        encoder = model.macrl
        pooling = encoder.config.pooling
        try:
            features, labels, _ = extract_pooled_features(
                encoder, self.processor, self.queries, pools=(pooling,), batch_size=self.batch_size,
                device=self.device, progress=False, skip_unreadable=self.skip_unreadable,
            )
        finally:
            model.train(was_training)
        with torch.no_grad():
            predictions = self.classifier(features[pooling].to(self.device)).argmax(dim=1).cpu()  # [M]
        return round(100.0 * (predictions == labels).float().mean().item(), 2)

    @property
    def seconds(self) -> float:
        """What training and evaluating the probe cost so far."""
        return self.train_seconds + self.eval_seconds

    def pop(self) -> dict[str, float]:
        """The results not logged yet, with the mean training loss since the last log (and forget them)."""
        pending, self.pending = self.pending, {}
        if self._losses:
            pending["online_probe_loss"] = round(torch.stack(self._losses).mean().item(), 4)
            self._losses = []
        return pending

    # ----------------------------------------------------------------------------------------------- checkpoints

    def on_save(self, args, state, control, **kwargs):
        # into the staged checkpoint, before `AtomicCheckpoints` (after this in `RunCallbacks`) moves it into place
        if state.is_world_process_zero:
            self.save(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / ONLINE_PROBE_FILE)

    def save(self, path: Path) -> None:
        """The classifier and its optimiser's state as one safetensors file (the settings in its metadata)."""
        tensors = {f"classifier.{name}": value for name, value in self.classifier.state_dict().items()}
        optimizer = self.optimizer.state_dict()
        for index, state in optimizer["state"].items():
            tensors.update({f"optimizer.{index}.{name}": value for name, value in state.items()})
        save_file(
            {name: value.detach().cpu().contiguous() for name, value in tensors.items()}, str(path),
            metadata={"param_groups": json.dumps(optimizer["param_groups"])},
        )

    def load(self, checkpoint: str | Path) -> bool:
        """Continue from the probe saved in `checkpoint`; False (and the probe starts afresh, said in the log) where
        the checkpoint has none: a run started without `--online-probe`.

        Raises:
            CheckpointError: the file is there but truncated or not this probe's (another number of classes).
        """
        path = Path(checkpoint) / ONLINE_PROBE_FILE
        if not path.is_file():
            logger.info("%s holds no online probe (the run trained without it): the probe starts afresh", checkpoint)
            return False
        try:
            with safe_open(str(path), framework="pt") as file:
                param_groups = json.loads(file.metadata()["param_groups"])
            tensors = load_file(str(path), device=str(self.device))
            self.classifier.load_state_dict(
                {name.removeprefix("classifier."): value for name, value in tensors.items() if name.startswith("classifier.")}
            )
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path} cannot be resumed from ({first_line(error)})") from error
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value.cpu() if key == "step" else value
        self.optimizer.load_state_dict({"state": state, "param_groups": param_groups})
        return True
