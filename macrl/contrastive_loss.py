"""InfoNCE in MoCo v3 form, with keys gathered from every process (moco-v3 `moco/builder.py`)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import concat_all_gather, is_distributed


def info_nce_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: float,
    queue: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoCo v3 contrastive loss of this process's queries against the keys of the whole global batch.

    Args:
        queries: `[B, P]` predictor outputs of the main branch (this process's share of the batch).
        keys: `[B, P]` projector outputs of the momentum branch for the same images (gathered here).
        temperature: softmax temperature τ.
        queue: optional `[K, P]` L2-normalised extra negatives (MoCo v2 memory bank).

    Returns:
        The scalar loss, scaled by 2τ as in MoCo v3 so that its gradient does not depend on τ.
    """
    queries = F.normalize(queries, dim=1)  # [B, P]
    keys = F.normalize(keys, dim=1)
    all_keys = concat_all_gather(keys)  # [W*B, P]
    logits = queries @ all_keys.T  # [B, W*B]
    if queue is not None:
        logits = torch.cat([logits, queries @ queue.T], dim=1)  # [B, W*B + K]
    logits = logits / temperature
    # the positive of query i is key i of this process's slice of the gathered keys
    rank = dist.get_rank() if is_distributed() else 0
    labels = torch.arange(queries.shape[0], device=queries.device) + rank * queries.shape[0]
    return F.cross_entropy(logits.float(), labels) * (2 * temperature)
