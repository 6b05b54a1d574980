"""The on-policy methods' registry: objective name -> how its rollouts are made.

An objective registered with `rollouts=True` (`dpo_jax.objectives`) trains on batches its
`Method` builds from the current policy's samples (a `rollouts.RolloutSource`), through
the Trainer's one loop (`dpo_jax.loop.run_loop`). `train.train` asks this module for
the prompts, the reward and the source; `configs.validate` for the settings' checks.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from dpo_jax import data, group_loop, online_dpo, ppo, ppo_loop, reward_sources, rollouts
from dpo_jax.errors import config_error

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Method:
    """An on-policy method: its settings (checked), its step source and batch columns."""

    settings: Callable[[ml_collections.ConfigDict], Any]  # run config -> checked settings
    # (config, prompts, reward, ref_params, mesh) -> the step source; a method that
    # `uses_judge` gets the judge in `reward`'s place when `online.judge` labels its
    # rollouts (`inputs_from_config`)
    build: Callable[..., rollouts.RolloutSource]
    columns: Callable[[ml_collections.ConfigDict], tuple[str, ...]]  # its batch columns
    uses_judge: bool = False  # may be labelled by `online.judge` instead of a reward
    # run config -> the step's reference mode ("none": reference statistics, if any,
    # come as batch columns the objective reads; "precomputed": a `ref_logps` column)
    step_reference: Callable[[ml_collections.ConfigDict], str] = lambda config: "none"


def _builder(settings: Callable[..., Any], source: type) -> Callable[..., Any]:
    """`build` of a method whose source takes (settings, prompts, reward, reference, seed,
    mesh)."""

    def build(config, prompts, reward, ref_params, mesh):  # noqa: ANN001, ANN202
        return source(settings(config), prompts, reward, ref_params, int(config.seed), mesh)

    return build


METHODS: dict[str, Method] = {
    "ppo": Method(
        ppo_loop.PPOConfig.from_config,
        _builder(ppo_loop.PPOConfig.from_config, ppo_loop.PPOSource),
        lambda c: ppo.BATCH_COLUMNS,
    ),
    **{
        name: Method(
            group_loop.GroupConfig.from_config,
            _builder(group_loop.GroupConfig.from_config, group_loop.GroupSource),
            group_loop.batch_columns,
        )
        for name in group_loop.METHODS
    },
    "online_dpo": Method(
        online_dpo.OnlineDPOConfig.from_config,
        online_dpo.build_source,
        online_dpo.batch_columns,
        uses_judge=True,
        step_reference=online_dpo.step_reference,
    ),
}


def method(config: ml_collections.ConfigDict) -> Method | None:
    """The on-policy method of `config.objective.name`, or None (offline data)."""
    return METHODS.get(config.objective.name)


def check(config: ml_collections.ConfigDict) -> None:
    """The method's settings and the reward spec's syntax (nothing loads)."""
    m = method(config)
    if m is None:
        return
    lora_rank = config.lora.rank
    if lora_rank:
        # The rollouts sample and score `state.params` as the model's params; with LoRA
        # those are the adapters, and the adapters-off reference is not wired in.
        raise config_error(
            "lora.rank", f"{lora_rank}, but {config.objective.name} samples and scores the "
            "full policy (LoRA adapters are not wired into rollouts)", "set lora.rank=0",
        )  # fmt: skip
    m.settings(config)
    if config.online.reward:
        specs = reward_sources.parse(config.online.reward, key="online.reward")
        reward_sources.weights_of(
            config.online.reward_weights, len(specs), config.online.reward, key="online.reward"
        )


def check_paths(config: ml_collections.ConfigDict) -> None:
    """What the reward and judge specs point at, before anything loads."""
    if method(config) is None:
        return
    if config.online.reward:
        reward_sources.check_spec(
            config.online.reward, key="online.reward", weights=config.online.reward_weights
        )
    if config.online.judge:
        reward_sources.check_judge_spec(config.online.judge, key="online.judge")


def inputs_from_config(
    config: ml_collections.ConfigDict, prompts: Any, reward: Any
) -> tuple[Sequence[Sequence[int]], Any]:
    """The prompt pool and the reward: `train(..., train_data=prompts, reward=fn)` when
    given, else from `data.train` (`data.load_prompts`) and `online.reward`
    (`reward_sources.from_spec`), as `dpo-jax train` runs it. A method that `uses_judge`
    with `online.judge` set gets, in the reward's place, the judge on decoded samples
    (`online_dpo.SampleJudge`: `reward_sources.judge_from_spec` and the tokenizer)."""
    spec = config.online.reward
    m = method(config)
    if reward is not None and spec:
        raise config_error(
            "online.reward", f"{spec!r}, and train() was given reward= too", "give one of them"
        )  # fmt: skip
    judged = m is not None and m.uses_judge and bool(config.online.judge)
    if judged and reward is not None:
        raise config_error(
            "online.judge", f"{config.online.judge!r}, and train() was given reward= too",
            "give one of them",
        )  # fmt: skip
    if reward is None and not spec and not judged:
        raise config_error(
            "online.reward", f"is empty: {config.objective.name} scores its rollouts with a reward",
            f"use {reward_sources.SPECS} (Python: train(..., reward=fn), docs/ONLINE.md)",
        )  # fmt: skip
    if prompts is not None and (reward is not None or not spec) and not judged:
        return prompts, reward
    from transformers import AutoTokenizer

    name = config.tokenizer or config.model.path
    if not name:
        raise config_error(
            "tokenizer", "is empty and so is model.path", "name the policy's tokenizer"
        )
    tokenizer = AutoTokenizer.from_pretrained(name)
    if prompts is None:
        prompts = data.load_prompts(config.data, tokenizer, config.run_dir or None, split="train")
        log.info("%s: %d distinct prompts from %s", config.objective.name, len(prompts),
                 config.data.train)  # fmt: skip
    if judged:
        judge = reward_sources.judge_from_spec(
            config.online.judge, key="online.judge", seed=int(config.seed)
        )
        return prompts, online_dpo.SampleJudge(judge, tokenizer)
    if reward is None and spec:
        reward = reward_sources.from_spec(
            spec, tokenizer, weights=config.online.reward_weights, key="online.reward"
        )
    return prompts, reward


def build_source(
    config: ml_collections.ConfigDict,
    trainer: Any,
    state: Any,
    prompts: Sequence[Sequence[int]],
    reward: Any,
    ref_params: Any,
    dry_run: bool = False,
) -> rollouts.RolloutSource:
    """The step source of `config`'s on-policy objective, its frozen reference sharded
    like the policy (`ref_params`: another reference's model params, or None for a copy
    of the initial policy; never checkpointed; none for a dry run's abstract state)."""
    ref = None if dry_run else rollouts.reference_params(trainer, state, ref_params)
    return METHODS[config.objective.name].build(config, prompts, reward, ref, trainer.mesh)
