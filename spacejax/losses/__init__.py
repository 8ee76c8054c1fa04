"""Sequence log-probs and the self-play loss family: pure functions of arrays -> (loss, metrics).

    logps.py    sequence log-probs of responses, from logits or, in chunks, from hidden states
    family.py   the losses (SPACE, SPIN and baselines), their registry `LOSSES` and their metrics

`from spacejax import losses` gives both: `losses.sequence_logps(logits, tokens, loss_mask)`,
`losses.space_loss(...)`, `losses.get_loss(kind)`.
"""

from spacejax.losses.family import (LOSSES, Loss, Scores, TokenMean, dpo_loss, get_loss, hinge_loss, ipo_loss,
                                    nca_pair_loss, per_token_mean, sft_loss, space_loss, spin_loss, sppo_hard_loss)
from spacejax.losses.logps import (LOGIT_CHUNK_LENGTH, sequence_logps, sequence_logps_and_counts,
                                   sequence_logps_and_greedy_from_hidden, sequence_logps_from_hidden, target_counts)

__all__ = ["LOGIT_CHUNK_LENGTH", "LOSSES", "Loss", "Scores", "TokenMean", "dpo_loss", "get_loss", "hinge_loss",
           "ipo_loss", "nca_pair_loss", "per_token_mean", "sequence_logps", "sequence_logps_and_counts",
           "sequence_logps_and_greedy_from_hidden", "sequence_logps_from_hidden", "sft_loss", "space_loss", "spin_loss", "sppo_hard_loss", "target_counts"]
