"""Self-play: the algorithm of PAPER.md over components.

    algorithm.py   `self_play(cfg, parts)`: theta_0, then per iteration generate, score once, train,
                   evaluate, store; `run(cfg, workdir)` sets up and runs it (resuming)
    setup.py       `setup(cfg, workdir) -> Parts`: mesh, task, theta_0, store, generator, scorer,
                   trainer, objectives, evaluators, each from its config section
    store.py       the run directory: DONE markers, samples, finals, eval.json, step checkpoints
    chunks.py      the opponent's responses kept as they are generated (a stopped run keeps them)
    evaluators.py  held-out NLL, pair metrics, known-truth KL both ways, lm-eval scores (the list
                   `selfplay.evaluators` names)
    task.py        the real data: training and held-out examples

Randomness derives from (seed, iteration): generation keys from (seed, iteration, prompt,
sample), data order from (seed, iteration, epoch), so a resumed run reproduces an uninterrupted one.
"""

from spacejax.preemption import PREEMPTED_EXIT, Preempted
from spacejax.selfplay.algorithm import SFT_ITERATION, generation_seed, opponent_logps, pairs_of, run, self_play
from spacejax.selfplay.setup import Parts, check, initial_params, setup
from spacejax.selfplay.store import CONFIG_FILE, RunStore
from spacejax.selfplay.task import Task, load_task
from spacejax.trainer import NonFiniteLoss

__all__ = ["CONFIG_FILE", "NonFiniteLoss", "PREEMPTED_EXIT", "Parts", "Preempted", "RunStore", "SFT_ITERATION",
           "Task", "check", "generation_seed", "initial_params", "load_task", "opponent_logps", "pairs_of", "run",
           "self_play", "setup"]
