"""The self-play loss family (SPACE, SPIN and baselines): one registry entry per loss kind.

Pure functions of arrays: jit-able, vmap-able, differentiable, with no Python branching on array
values. The formulas are those of PAPER.md. Notation, per pair b:

    a   = r(y)  = policy_real_logps - opponent_real_logps                  [B]     real reward
    b_k = r(y') = policy_generated_logps - opponent_generated_logps         [B, K]  synthetic rewards
    h_k = a - b_k                                                          [B, K]  margins

Generated (synthetic) log-probs may be `[B]` (one synthetic response per prompt) or `[B, K]`
(K responses per prompt). Every loss averages its synthetic terms over the K responses: SPACE's
`mu / K * sum_k softplus(b_k - log mu)` is the estimator of PAPER.md, and the pairwise losses
(SPIN, DPO, hinge, IPO) average the pair loss over the K pairs (real, synthetic_k), so K = 1 is
the usual pair loss and a row's weight does not grow with K.

A loss kind is a `Loss` of `LOSSES`: a formula from the batch's `Scores` and the loss's settings
to the per-pair loss [B], and the settings it takes, with their defaults: float `hyperparameters`
(may be traced, so one compiled program serves every value) and static `options` (a choice among
values, fixed in the compiled program). Called, a `Loss` is the loss function

    loss_fn(policy_real_logps, policy_generated_logps, opponent_real_logps,
            opponent_generated_logps, <settings, in declared order or by name>, *,
            real_token_counts=None, generated_token_counts=None) -> (per_pair_loss [B], metrics)

e.g. `space_loss(..., mu=1.0, beta=1.0)` or `spin_loss(..., beta=0.1, kind="sigmoid" | "hinge")`,
where the log-probs are sequence sums over response tokens (`logps.py`) and the optional token
counts (`sequence_logps_and_counts`, same shapes as the log-probs) are needed by `ipo` and by
`sft` with per_token, and add per-token metrics to every loss. `Loss.evaluate(scores, **settings)`
takes the `Scores` themselves: those of the real responses alone (no opponent, no synthetic
responses: the SFT warm-up) serve a loss of the policy's real log-probs, `sft`.

Metrics are float scalars, means over the batch (and over the K synthetic responses), the same
function of the scores and the settings for every loss:
    loss                          the batch's loss: the mean per-pair loss (sft with per_token:
                                  the token mean, each row weighted by its token count)
    rewards/real                  mean a         (raw implicit reward, sequence level)
    rewards/generated             mean b_k
    rewards/margins               mean a - b_k
    rewards/accuracies            fraction of (real, synthetic_k) pairs with a > b_k
    rewards/real_scaled           mean beta * a  (losses with a beta; SPIN logs these in its paper)
    rewards/generated_scaled      mean beta * b_k
    rewards/margins_scaled        mean beta * (a - b_k)
    logps/real, logps/generated   mean policy sequence log-probs
    logps/real_per_token          mean over rows of policy log-prob / token count (counts given)
    logps/generated_per_token
    nce/accuracy                  losses with a mu (SPACE): fraction of (real, synthetic_k) pairs
                                  with beta * a > log mu and beta * b_k < log mu
Rewards are always the sequence-level ones, also for IPO (whose loss uses per-token means), so
curves of different kinds are comparable. Scores of the real responses alone have only `loss`
and the `logps/real` metrics.

TRL's names (its DPOTrainer's, with TRL's meaning: chosen = the real response y, rejected = the
synthetic y'_k), logged alongside ours for pair scores:
    rewards/chosen                mean beta * a    (losses with a beta)
    rewards/rejected              mean beta * b_k  (losses with a beta)
    logps/chosen, logps/rejected  mean policy log-probs of y and y'_k
as TRL computes them from the log-probs its loss reads: sequence sums, but per-token means for
IPO (TRL averages IPO's log-probs over the tokens; `Loss.token_mean_logps`), so for IPO these are
not `rewards/real_scaled` and `logps/real`. TRL's `rewards/margins` (beta * (a - b)) and SPIN's
own `rewards/real`, `rewards/generated`, `rewards/margins` (spin/alignment/trainer.py: beta * r)
are scaled by beta, while ours of those names are the raw r: compare theirs with our
`rewards/real_scaled`, `rewards/generated_scaled`, `rewards/margins_scaled`.
`rewards/accuracies` means the same in all three.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from spacejax.losses.logps import compute_dtype

Array = jax.Array
Metrics = dict[str, Array]

# --------------------------------------------------------------------------- the inputs


def per_token_mean(logps: Array, token_counts: Array) -> Array:
    """logps / token_counts, with 0 where a row has no tokens (any shape, elementwise)."""
    return logps / jnp.maximum(token_counts, 1)


def _as_float(x) -> Array:
    x = jnp.asarray(x)
    return x.astype(compute_dtype(x.dtype))


def _per_sample(generated: Array) -> Array:
    """Synthetic values as [B, K]: a [B] input is K = 1."""
    return generated[:, None] if generated.ndim == 1 else generated


_REAL = ("policy_real_logps", "opponent_real_logps", "real_token_counts")
_GENERATED = ("policy_generated_logps", "opponent_generated_logps", "generated_token_counts")


@dataclasses.dataclass(frozen=True, eq=False)
class Scores:
    """What a loss reads of a batch of B prompts x, each with its real response y and K synthetic
    responses y'_k; float32 (or wider) arrays, `[B]` synthetic values stored as `[B, 1]`:

        policy_real_logps, opponent_real_logps              [B]     log p_theta(y|x), log p_theta_t(y|x)
        policy_generated_logps, opponent_generated_logps    [B, K]  the same of each y'_k
        real_token_counts [B], generated_token_counts [B, K]        |y|, |y'_k| (response tokens)

    Counts are None where not given; the opponent's and the synthetic log-probs are None for the
    real responses alone. A formula reads what it needs: what is missing is a ValueError naming it.
    """

    policy_real_logps: Array
    policy_generated_logps: Optional[Array] = None
    opponent_real_logps: Optional[Array] = None
    opponent_generated_logps: Optional[Array] = None
    real_token_counts: Optional[Array] = None
    generated_token_counts: Optional[Array] = None

    def __post_init__(self):
        for name in _REAL + _GENERATED:
            value = getattr(self, name)
            if value is not None:
                value = _as_float(value)
                object.__setattr__(self, name, _per_sample(value) if name in _GENERATED else value)

    def required(self, *names: str) -> tuple[Array, ...]:
        """The fields `names`; a ValueError lists those that are None."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"this loss needs {', '.join(missing)}")
        return tuple(getattr(self, name) for name in names)

    @property
    def rewards(self) -> tuple[Array, Array]:
        """(a [B], b [B, K]): r(u) = log p_theta(u|x) - log p_theta_t(u|x) of the real and the
        synthetic responses."""
        policy_generated, opponent_real, opponent_generated = self.required(
            "policy_generated_logps", "opponent_real_logps", "opponent_generated_logps")
        return self.policy_real_logps - opponent_real, policy_generated - opponent_generated

    @property
    def per_token_rewards(self) -> tuple[Array, Array]:
        """(a [B], b [B, K]) of per-token mean log-probs: log p_theta(u|x) / |u| - log p_theta_t(u|x) / |u|."""
        real_counts, generated_counts, policy_generated, opponent_real, opponent_generated = self.required(
            "real_token_counts", "generated_token_counts", "policy_generated_logps", "opponent_real_logps",
            "opponent_generated_logps")
        return (per_token_mean(self.policy_real_logps, real_counts) - per_token_mean(opponent_real, real_counts),
                per_token_mean(policy_generated, generated_counts)
                - per_token_mean(opponent_generated, generated_counts))


class TokenMean(NamedTuple):
    """A loss over tokens rather than pairs: a pair's loss is summed / counts (0 without tokens),
    the batch's sum(summed) / sum(counts), so every token of the batch weighs the same."""

    summed: Array  # [B]
    counts: Array  # [B]


def _metrics(loss: Array, scores: Scores, settings: Mapping[str, object], token_mean_logps: bool = False) -> Metrics:
    """The metrics of the module docstring: the batch's `loss` [], the rewards and log-probs of
    `scores`, the `_scaled` rewards for settings with a `beta`, `nce/accuracy` with a `mu`, and
    TRL's names (`_trl_metrics`)."""
    policy_real = scores.policy_real_logps
    out = {"loss": loss, "logps/real": jnp.mean(policy_real)}
    if scores.real_token_counts is not None:
        out["logps/real_per_token"] = jnp.mean(per_token_mean(policy_real, scores.real_token_counts))
    if scores.policy_generated_logps is None:  # the real responses alone: no rewards
        return out
    real, generated = scores.rewards
    margins = real[:, None] - generated                                                    # [B, K]
    out.update({
        "rewards/real": jnp.mean(real),
        "rewards/generated": jnp.mean(generated),
        "rewards/margins": jnp.mean(margins),
        "rewards/accuracies": jnp.mean((margins > 0).astype(real.dtype)),
        "logps/generated": jnp.mean(scores.policy_generated_logps),
    })
    if scores.generated_token_counts is not None:
        out["logps/generated_per_token"] = jnp.mean(
            per_token_mean(scores.policy_generated_logps, scores.generated_token_counts))
    if "beta" in settings:
        beta = settings["beta"]
        for name in ("real", "generated", "margins"):
            out[f"rewards/{name}_scaled"] = beta * out[f"rewards/{name}"]
    if "mu" in settings:
        log_mu, beta = jnp.log(settings["mu"]), settings["beta"]
        classified = (beta * real[:, None] > log_mu) & (beta * generated < log_mu)
        out["nce/accuracy"] = jnp.mean(classified.astype(real.dtype))
    out.update(_trl_metrics(scores, settings, token_mean_logps))
    return out


def _trl_metrics(scores: Scores, settings: Mapping[str, object], token_mean_logps: bool) -> Metrics:
    """TRL's `logps/chosen`, `logps/rejected` and (with a `beta`) `rewards/chosen`, `rewards/rejected`
    of pair scores (module docstring): of per-token mean log-probs where `token_mean_logps`."""
    if token_mean_logps:
        real_counts, generated_counts = scores.required("real_token_counts", "generated_token_counts")
        chosen = per_token_mean(scores.policy_real_logps, real_counts)                    # [B]
        rejected = per_token_mean(scores.policy_generated_logps, generated_counts)        # [B, K]
        real, generated = scores.per_token_rewards
    else:
        chosen, rejected = scores.policy_real_logps, scores.policy_generated_logps
        real, generated = scores.rewards
    out = {"logps/chosen": jnp.mean(chosen), "logps/rejected": jnp.mean(rejected)}
    if "beta" in settings:
        out["rewards/chosen"] = settings["beta"] * jnp.mean(real)
        out["rewards/rejected"] = settings["beta"] * jnp.mean(generated)
    return out


# --------------------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True, eq=False)
class Loss:
    """A loss kind: `formula(scores, **settings)` -> per-pair loss [B] (or a TokenMean), its float
    `hyperparameters` {name: default} and static `options` {name: (default, *other choices)}.
    `config_keys` names the LossConfig field of a setting whose field has another name.
    `token_mean_logps`: the loss reads per-token mean log-probs (IPO), as TRL's metrics then do."""

    name: str
    formula: Callable[..., Array | TokenMean]
    hyperparameters: Mapping[str, float] = dataclasses.field(default_factory=dict)
    options: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    config_keys: Mapping[str, str] = dataclasses.field(default_factory=dict)
    token_mean_logps: bool = False

    @property
    def defaults(self) -> dict[str, object]:
        """{setting: default}: the hyperparameters, then the options (the order of positional settings)."""
        return {**self.hyperparameters, **{name: choices[0] for name, choices in self.options.items()}}

    def config_key(self, setting: str) -> str:
        """The LossConfig field that holds `setting`."""
        return self.config_keys.get(setting, setting)

    def config_values(self, cfg) -> dict[str, object]:
        """{setting: its field's value in LossConfig `cfg` (None where null)}."""
        return {name: getattr(cfg, self.config_key(name)) for name in self.defaults}

    def settings(self, given: Mapping[str, object]) -> dict[str, object]:
        """The defaults updated by `given`; an unknown setting is a TypeError, an option outside its
        choices a ValueError."""
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise TypeError(f"loss kind {self.name!r} has no setting {unknown[0]!r}; "
                            f"its settings: {list(self.defaults)}")
        settings = {**self.defaults, **given}
        for name, choices in self.options.items():
            if settings[name] not in choices:
                raise ValueError(f"loss kind {self.name!r}: {name} must be {' or '.join(map(repr, choices))}, "
                                 f"got {settings[name]!r}")
        return settings

    def evaluate(self, scores: Scores, **settings) -> tuple[Array, Metrics]:
        """(per_pair_loss [B], metrics) of `scores` under `settings` (defaults for those left out)."""
        settings = self.settings(settings)
        per_pair = self.formula(scores, **settings)
        if isinstance(per_pair, TokenMean):
            loss = jnp.sum(per_pair.summed) / jnp.maximum(jnp.sum(per_pair.counts), 1.0)
            per_pair = per_token_mean(per_pair.summed, per_pair.counts)
        else:
            loss = jnp.mean(per_pair)
        return per_pair, _metrics(loss, scores, settings, self.token_mean_logps)

    def __call__(self, policy_real_logps, policy_generated_logps, opponent_real_logps, opponent_generated_logps,
                 *settings, real_token_counts=None, generated_token_counts=None,
                 **named_settings) -> tuple[Array, Metrics]:
        """The loss function (module docstring): log-probs real [B], generated [B] or [B, K]."""
        if len(settings) > len(self.defaults):
            raise TypeError(f"loss kind {self.name!r} takes {len(self.defaults)} settings after the log-probs "
                            f"({list(self.defaults)}), got {len(settings)}")
        scores = Scores(policy_real_logps=policy_real_logps, policy_generated_logps=policy_generated_logps,
                        opponent_real_logps=opponent_real_logps, opponent_generated_logps=opponent_generated_logps,
                        real_token_counts=real_token_counts, generated_token_counts=generated_token_counts)
        return self.evaluate(scores, **dict(zip(self.defaults, settings)), **named_settings)


def _space(scores: Scores, mu, beta) -> Array:
    """SPACE: noise contrastive estimation with the synthetic responses as noise (PAPER.md).

        loss = softplus(log mu - beta * a) + mu / K * sum_k softplus(beta * b_k - log mu)

    i.e. minus the NCE objective log sigma_mu(beta a) + mu * mean_k log(1 - sigma_mu(beta b_k)),
    sigma_mu(z) = sigmoid(z - log mu). Computed only through softplus (never mu * exp(-r)), so it
    is finite for any finite rewards. With mu = K the synthetic term is sum_k softplus(b_k - log mu):
    K samples of weight 1. mu > 0."""
    real, generated = scores.rewards
    log_mu = jnp.log(mu)
    return (jax.nn.softplus(log_mu - beta * real)                                           # [B]
            + mu * jnp.mean(jax.nn.softplus(beta * generated - log_mu), axis=-1))            # [B]


def _dpo(scores: Scores, beta, label_smoothing) -> Array:
    """DPO / SPIN sigmoid with label smoothing eps (conservative DPO):

        loss = mean_k [ -(1 - eps) log sigmoid(beta h_k) - eps log sigmoid(-beta h_k) ]"""
    real, generated = scores.rewards
    scaled_margins = beta * (real[:, None] - generated)                                    # [B, K]
    return jnp.mean(-(1.0 - label_smoothing) * jax.nn.log_sigmoid(scaled_margins)
                    - label_smoothing * jax.nn.log_sigmoid(-scaled_margins), axis=-1)


def _hinge(scores: Scores, beta) -> Array:
    """Hinge (SLiC / SPIN hinge): loss = mean_k max(0, 1 - beta h_k)."""
    real, generated = scores.rewards
    return jnp.mean(jax.nn.relu(1.0 - beta * (real[:, None] - generated)), axis=-1)


def _spin(scores: Scores, beta, kind) -> Array:
    """SPIN (Chen et al. 2024): a loss of the reward gap only, h_k = a - b_k.

        sigmoid: loss = mean_k -log sigmoid(beta * h_k)      (log 2 at the start of an iteration)
        hinge:   loss = mean_k max(0, 1 - beta * h_k)"""
    return _dpo(scores, beta, 0.0) if kind == "sigmoid" else _hinge(scores, beta)


def _ipo(scores: Scores, beta) -> Array:
    """IPO: loss = mean_k (h_k - 1 / (2 beta))^2 on PER-TOKEN MEAN log-probs (policy and opponent
    score the same tokens), so it needs the token counts."""
    real, generated = scores.per_token_rewards
    return jnp.mean(jnp.square(real[:, None] - generated - 1.0 / (2.0 * beta)), axis=-1)


def _nca_pair(scores: Scores, beta) -> Array:
    """NCA, pairwise form: loss = -log sigmoid(beta a) - 0.5 log sigmoid(-beta a)
    - 0.5 mean_k log sigmoid(-beta b_k)."""
    real, generated = scores.rewards
    return (-jax.nn.log_sigmoid(beta * real)
            - 0.5 * jax.nn.log_sigmoid(-beta * real)
            - 0.5 * jnp.mean(jax.nn.log_sigmoid(-beta * generated), axis=-1))


def _sppo_hard(scores: Scores, beta) -> Array:
    """SPPO with hard labels: loss = (a - 1/(2 beta))^2 + mean_k (b_k + 1/(2 beta))^2."""
    real, generated = scores.rewards
    target = 1.0 / (2.0 * beta)
    return jnp.square(real - target) + jnp.mean(jnp.square(generated + target), axis=-1)


def _sft(scores: Scores, per_token) -> Array | TokenMean:
    """Supervised fine-tuning on the real responses: loss = -log p(y|x); with per_token the
    token-mean NLL (a TokenMean over the real token counts). Reads the policy's real log-probs only."""
    nll = -scores.policy_real_logps
    return TokenMean(nll, *scores.required("real_token_counts")) if per_token else nll


LOSSES: dict[str, Loss] = {loss.name: loss for loss in (
    Loss("space", _space, {"mu": 1.0, "beta": 1.0}),
    Loss("spin", _spin, {"beta": 0.1}, {"kind": ("sigmoid", "hinge")}, config_keys={"kind": "spin_kind"}),
    Loss("dpo", _dpo, {"beta": 0.1, "label_smoothing": 0.0}),
    Loss("hinge", _hinge, {"beta": 0.1}),
    Loss("ipo", _ipo, {"beta": 0.1}, token_mean_logps=True),
    Loss("nca_pair", _nca_pair, {"beta": 0.1}),
    Loss("sppo_hard", _sppo_hard, {"beta": 0.1}),
    Loss("sft", _sft, options={"per_token": (False, True)}),
)}

space_loss = LOSSES["space"]
spin_loss = LOSSES["spin"]
dpo_loss = LOSSES["dpo"]
hinge_loss = LOSSES["hinge"]
ipo_loss = LOSSES["ipo"]
nca_pair_loss = LOSSES["nca_pair"]
sppo_hard_loss = LOSSES["sppo_hard"]
sft_loss = LOSSES["sft"]


def get_loss(kind: str) -> Loss:
    """The loss registered as `kind`; a ValueError lists the known kinds."""
    try:
        return LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown loss kind {kind!r}; known kinds: {', '.join(sorted(LOSSES))}") from None
