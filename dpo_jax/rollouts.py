"""What every on-policy method shares: prompts, sampling, host shares, the scoring pass,
and `RolloutSource`, the step source (`dpo_jax.loop.StepSource`) that collects a rollout
with the state the loop hands it and yields the rollout's optimizer steps.

    rollout r:  prompts (a fresh permutation per pass, seeded by (seed, pass))
                -> sampling.generate under the current policy, key fold_in(key(seed), r)
                -> the method's `collect`: rewards or labels, a scoring pass, advantages
                   or pairs -> the rollout's step batches
    then        the Trainer's one loop runs those steps; the next call collects r + 1.

Multi-host: every host draws the same prompts and holds the whole rollout (the sampler
runs on all devices, rows split over the data-parallel axes, and gathers its output); the
work on it is split: each host rewards its share of the samples, feeds its share of each
scoring micro-batch and of each update's micro-batches (`host_rows`), and the results
are gathered back in sample order. `online.rollout_batch_size` counts the samples of all
hosts together.

Everything random is a function of `(seed, rollout index)`, so the data state at a
rollout boundary (`{"rollout": r, ...the method's controller...}`) resumes exactly. A
checkpoint due inside a rollout is taken at its end (`at_boundary`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import logprobs, models, objectives, sampling, scoring, sharding
from dpo_jax.data import batching
from dpo_jax.errors import UserError, config_error
from dpo_jax.loop import StepBatch
from dpo_jax.reward_sources import RolloutReward

# The settings every on-policy method shares: `online.*` (configs/default.py). The old
# `ppo.<key>` names of these are deprecated aliases (`configs.migrate_deprecated`).
SHARED_KEYS = (
    "num_rollouts", "rollout_batch_size", "samples_per_prompt", "max_new_tokens",
    "temperature", "num_mini_batches", "kl_coef", "reward", "reward_weights", "judge",
    "missing_eos_penalty",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """The shared rollout settings (`config.online` + the run's `grad_accum_steps`);
    every field comes from configs/default.py, none has a default here."""

    num_rollouts: int
    rollout_batch_size: int  # samples per rollout (prompts x samples_per_prompt), all hosts
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    num_mini_batches: int  # optimizer updates per pass over the rollout
    grad_accum_steps: int  # micro-batches per update (the step's A)
    kl_coef: float

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> RolloutConfig:
        """From `config.online` and `grad_accum_steps`, checked (one config error each)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"grad_accum_steps"}
        out = cls(
            grad_accum_steps=int(config.grad_accum_steps),
            **{k: config.online[k] for k in fields},
        )
        out.check()
        return out

    def check(self) -> None:
        """The shared ranges and divisibility rules."""
        for key in ("num_rollouts", "num_mini_batches", "max_new_tokens", "samples_per_prompt"):
            if getattr(self, key) < 1:
                raise config_error(f"online.{key}", f"must be >= 1, got {getattr(self, key)}")
        s = self.rollout_batch_size
        if s < 1 or s % self.samples_per_prompt:
            raise config_error(
                "online.rollout_batch_size", f"{s} is not a positive multiple of "
                f"online.samples_per_prompt={self.samples_per_prompt}", "make it one",
            )  # fmt: skip
        rows = self.num_mini_batches * self.grad_accum_steps
        if s % rows:
            raise config_error(
                "online.rollout_batch_size", f"{s} samples do not split into "
                f"online.num_mini_batches={self.num_mini_batches} x grad_accum_steps="
                f"{self.grad_accum_steps} equal micro-batches", "make it a multiple of their product",
            )  # fmt: skip
        if not self.temperature > 0:
            raise config_error("online.temperature", f"must be > 0, got {self.temperature}")
        if not self.kl_coef >= 0:
            raise config_error("online.kl_coef", f"must be >= 0, got {self.kl_coef}")

    @property
    def prompts_per_rollout(self) -> int:
        return self.rollout_batch_size // self.samples_per_prompt

    @property
    def rows_per_micro(self) -> int:
        """Samples in one micro-batch of an update (all hosts)."""
        return self.rollout_batch_size // (self.num_mini_batches * self.grad_accum_steps)

    def sampling(self, eos_token_ids: Sequence[int], pad_token_id: int) -> sampling.SamplingConfig:
        """Rollout decoding: untruncated, at `temperature` (1: the policy's own
        distribution, which importance ratios and KL estimates assume)."""
        return sampling.SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=float(self.temperature),
            n=self.samples_per_prompt, eos_token_ids=tuple(eos_token_ids),
            pad_token_id=pad_token_id,
        )  # fmt: skip


# ------------------------------------------------------------------------ host shares


def host_rows(num_rows: int) -> slice:
    """This process's rows of `num_rows` global ones: equal consecutive shares in process
    order (the whole range on one host). `check_hosts` checks that they divide."""
    size = num_rows // jax.process_count()
    return slice(jax.process_index() * size, (jax.process_index() + 1) * size)


def gather_hosts(x: Any) -> Any:
    """Host numpy of `x` on every host: a global array's value (one host: `device_get`),
    or each host's local numpy array concatenated along axis 0 in process order."""
    if jax.process_count() == 1:
        return jax.device_get(x)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def number_rows(sequence_index_NxL: np.ndarray) -> np.ndarray:
    """Sequence numbers of stacked rows (`[..., N, L]`): row `k` is sequence `k`, the
    numbering of a batch of `n_seq = N` (the rollout's rows carry their sample numbers)."""
    rows = np.arange(sequence_index_NxL.shape[-2], dtype=np.int32)[:, None]
    return np.where(sequence_index_NxL >= 0, rows, -1).astype(np.int32)


def host_share(batch_A: Mapping[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    """This host's rows of a `[A, N, ...]` batch, numbered as a batch of their own (what
    `Trainer.step` takes from each host: `trainer.globalize_host_batch` numbers them
    globally, host after host)."""
    out = {k: v[:, rows] for k, v in batch_A.items()}
    out["sequence_index"] = number_rows(out["sequence_index"])
    return out


def sample_rows(samples: sampling.SampleOutput, rows: slice) -> sampling.SampleOutput:
    """The samples `rows` of a rollout (what one host's reward scores)."""
    cut = {
        f.name: getattr(samples, f.name)[rows]
        for f in dataclasses.fields(samples)
        if isinstance(getattr(samples, f.name), np.ndarray)
    }
    if samples.texts is not None:
        cut["texts"] = samples.texts[rows]
    return dataclasses.replace(samples, **cut)


def check_hosts(rows_per_micro: int, data_parallel: int) -> None:
    """Each host feeds an equal share of a micro-batch's rows, a multiple of the
    data-parallel devices (`sharding.shard_batch`'s rule for a host's rows)."""
    hosts = jax.process_count()
    if hosts > 1 and (rows_per_micro % hosts or rows_per_micro // hosts % data_parallel):
        raise config_error(
            "online.rollout_batch_size", f"micro-batches of {rows_per_micro} samples "
            f"(rollout_batch_size / (num_mini_batches x grad_accum_steps)) do not split into "
            f"{hosts} hosts' equal shares of a multiple of {data_parallel} data-parallel devices",
            f"make it a multiple of {hosts * data_parallel} per micro-batch",
        )  # fmt: skip


def reward_scores(reward: RolloutReward, samples: sampling.SampleOutput) -> np.ndarray:
    """`[S]` float32 scores of a rollout: each host scores its share of the samples with
    `reward`, and the shares are gathered in sample order."""
    share = host_rows(samples.tokens.shape[0])
    mine = np.asarray(reward(sample_rows(samples, share)), np.float32).reshape(-1)
    if mine.shape[0] != share.stop - share.start:
        raise UserError(
            f"online.reward: {mine.shape[0]} scores for {share.stop - share.start} completions"
        )
    return np.asarray(gather_hosts(mine), np.float32)


# ------------------------------------------------------------------------ rows


def prompt_indices(num_prompts: int, per_rollout: int, rollout: int, seed: int) -> np.ndarray:
    """Which prompts rollout `rollout` continues: consecutive slices of a fresh
    permutation per pass over the prompts (a pure function of its arguments)."""
    start = rollout * per_rollout
    out = []
    while len(out) < per_rollout:
        epoch, offset = divmod(start + len(out), num_prompts)
        order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
        out.extend(order[offset : offset + per_rollout - len(out)].tolist())
    return np.asarray(out, np.int64)


def mini_batches(
    cfg: RolloutConfig, batch: Mapping[str, np.ndarray], rollout: int, epoch: int, seed: int
):
    """The epoch's `[A, N/A, ...]` step batches: rows shuffled by `(seed, rollout, epoch)`,
    split into `num_mini_batches` updates of `grad_accum_steps` micro-batches each (each
    micro-batch's rows numbered as its sequences `0 .. N/A - 1`)."""
    num_rows = batch["input_ids"].shape[0]
    order = np.random.default_rng([seed, rollout, epoch, 0x990]).permutation(num_rows)
    size = num_rows // cfg.num_mini_batches
    for m in range(cfg.num_mini_batches):
        rows = order[m * size : (m + 1) * size]
        out = {k: v[rows].reshape(cfg.grad_accum_steps, -1, *v.shape[1:]) for k, v in batch.items()}
        out["sequence_index"] = number_rows(out["sequence_index"])
        yield out


# ------------------------------------------------------------------------ scoring pass


def score_rows(
    trainer: Any,
    fn: Callable[..., dict[str, jax.Array]],
    args: tuple[Any, ...],
    rows: Mapping[str, np.ndarray],
    rows_per_micro: int,
) -> dict[str, np.ndarray]:
    """`fn(*args, micro_batch, n_seq)` over every row, one micro-batch of rows at a time
    (the step's size; each host feeds its share of the micro-batch's rows, as to the
    step), gathered back in row order."""
    share = host_rows(rows_per_micro)
    num_rows = rows["input_ids"].shape[0]
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, num_rows, rows_per_micro):
        chunk = host_share(
            {k: v[None, start : start + rows_per_micro] for k, v in rows.items()}, share
        )
        host, n_seq = trainer.prepare_batch(chunk, share.stop - share.start)
        placed = trainer.place_batch(host)
        micro = {k: v[0] for k, v in placed.items()}
        with trainer.mesh_context():
            stats = fn(*args, micro, n_seq)
        parts.append(_in_sequence_order(gather_hosts(stats), gather_hosts(micro["sequence_index"])))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _in_sequence_order(
    stats: Mapping[str, np.ndarray], sequence_index_NxL: np.ndarray
) -> dict[str, np.ndarray]:
    """Rows of a gathered micro-batch sorted by their sequence number: host `h`'s row `k`
    is sequence `h n + k` (`host_share`; rollout objectives are unpaired, so
    `trainer.globalize_host_batch` numbers host after host), i.e. the rollout's order,
    whatever order the mesh's devices put the hosts' rows in (one host: unchanged)."""
    order = np.argsort(np.max(sequence_index_NxL, axis=-1), kind="stable")
    return {k: np.asarray(v)[order] for k, v in stats.items()}


def token_logps(
    apply_fn: Callable[..., Any],
    params: Any,
    batch: Mapping[str, jax.Array],
    n_seq: int,
    chunk_size: int = 0,
) -> jax.Array:
    """Per-token log-probs `[N, L]` of `params` (model params) on a micro-batch, by the
    step's own `scoring.score`."""
    out = scoring.score(
        apply_fn, params, batch, n_seq, needs=("token_logps",), chunk_size=chunk_size
    )
    return out.token_logps_NxL


@functools.lru_cache(maxsize=8)
def jitted(fn: Callable[..., Any], apply_fn: Callable[..., Any], chunk_size: int) -> Callable:
    """`fn(apply_fn, *args, batch, n_seq, chunk_size=)` jitted with `n_seq` static (keyed
    by everything it closes over: the function, the model's apply and the chunk size)."""

    def run(*args: Any) -> Any:
        *rest, n_seq = args
        return fn(apply_fn, *rest, n_seq, chunk_size=chunk_size)

    return jax.jit(run, static_argnums=(-1,))


# ------------------------------------------------------------------------ the source


def reference_params(trainer: Any, state: Any, ref_params: Any = None) -> Any:
    """The rollouts' frozen reference, sharded like the policy: a copy of the initial
    policy's model params, or `ref_params` (e.g. `reference.path`) with the vocabulary
    padded as the Trainer padded the policy's."""
    model_params, _ = objectives.split_params(trainer.step_config.objective_fn, state.params)
    shardings, _ = objectives.split_params(
        trainer.step_config.objective_fn, trainer.shardings.params
    )
    if ref_params is None:
        return jax.tree.map(jnp.copy, model_params)
    cfg = trainer.model_config
    if cfg.embed_vocab_size != cfg.vocab_size:
        ref_params = models.vocab.resize_vocab(ref_params, cfg, cfg.embed_vocab_size)
    return jax.device_put(ref_params, shardings)


def special_ids(model_config: Any) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) of a model config (pad: the first EOS when unset)."""
    eos = model_config.eos_token_id
    eos_ids = () if eos is None else (int(eos),) if isinstance(eos, int) else tuple(eos)
    pad = model_config.pad_token_id
    return eos_ids, int(pad if pad is not None else (eos_ids[0] if eos_ids else 0))


class RolloutSource:
    """A `StepSource` over rollouts: `collect(trainer, state, r)` returns rollout `r`'s
    step batches (`[A, N, ...]`, this host's rows) and metrics; they are handed out one
    per `next_step`, each with the rollout's metrics. Subclasses keep any controller in
    `controller_state()` / `load_controller(data)` and update it in `finish(r)` (called
    when rollout `r`'s last step is handed out, so the data state at the boundary is the
    next rollout's)."""

    def __init__(
        self,
        cfg: RolloutConfig,
        prompts: Sequence[Sequence[int]],
        reward: RolloutReward | None,
        ref_params: Any,
        seed: int,
        mesh: Any,
    ):
        check_hosts(cfg.rows_per_micro, sharding.data_parallel_size(mesh))
        self.cfg = cfg
        self.reward = reward
        self.ref_params = ref_params  # the frozen reference's model params (None: dry run)
        self.prompts = [list(p) for p in prompts]
        self.seed = int(seed)
        self.rollout = 0
        self._queue: list[jax.Array | dict] = []
        self._metrics: dict[str, Any] = {}
        self._host = host_rows(cfg.rows_per_micro)

    # -- what a method defines
    def collect(self, trainer: Any, state: Any, rollout: int) -> tuple[list[dict], dict]:
        raise NotImplementedError

    def steps_per_rollout(self) -> int:
        return self.cfg.steps_per_rollout  # every method's config says it

    def passes(self, batch: Mapping[str, np.ndarray], rollout: int, count: int) -> list[dict]:
        """`count` shuffled passes over a rollout's rows, each split into the updates'
        `[A, N/A, ...]` batches (`mini_batches`)."""
        return [
            batch_A
            for p in range(count)
            for batch_A in mini_batches(self.cfg, batch, rollout, p, self.seed)
        ]

    def controller_state(self) -> dict[str, Any]:
        return {}

    def load_controller(self, data_state: Mapping[str, Any]) -> None:
        pass

    def finish(self, rollout: int) -> None:
        pass

    # -- shared
    @property
    def num_steps(self) -> int:
        return self.cfg.num_rollouts * self.steps_per_rollout()

    def rollout_prompts(self, rollout: int) -> list[list[int]]:
        idx = prompt_indices(len(self.prompts), self.cfg.prompts_per_rollout, rollout, self.seed)
        return [self.prompts[i] for i in idx]

    def rollout_key(self, rollout: int) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.seed), rollout)

    def sample(self, trainer: Any, model_params: Any, rollout: int) -> sampling.SampleOutput:
        """Rollout `rollout`'s samples under `model_params` (the current policy)."""
        eos_ids, pad_id = special_ids(trainer.model_config)
        return sampling.generate(
            trainer.model_config, model_params, self.rollout_prompts(rollout),
            self.rollout_key(rollout), self.cfg.sampling(eos_ids, pad_id), mesh=trainer.mesh,
        )  # fmt: skip

    def scored_positions(self, trainer: Any, rows: dict[str, np.ndarray], width: int) -> None:
        """One K for the phase (`width` = max_new_tokens) when the step unembeds only the
        scored positions."""
        if trainer.step_config.unembed_scored_only:
            rows["scored_positions"] = logprobs.scored_positions(rows["sequence_index"], width)

    def next_step(self, trainer: Any, state: Any) -> StepBatch | None:
        if self.rollout >= self.cfg.num_rollouts:
            return None
        cfg = self.cfg
        # checked when rolling out, not when built: a dry run lowers the step from one
        # widest prompt
        if len(self.prompts) * cfg.samples_per_prompt < cfg.rollout_batch_size:
            raise UserError(
                f"online: {len(self.prompts)} prompts x {cfg.samples_per_prompt} samples is "
                f"fewer than online.rollout_batch_size={cfg.rollout_batch_size}"
            )
        if not self._queue:
            steps, metrics = self.collect(trainer, state, self.rollout)
            self._queue = list(steps)
            self._metrics = dict(metrics, rollout=self.rollout + 1)
        batch_A = self._queue.pop(0)
        if not self._queue:
            self.finish(self.rollout)
            self.rollout += 1
        host_batch_A, n_seq = self.share(batch_A)
        return StepBatch(host_batch_A, n_seq, self._metrics)

    def share(self, batch_A: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """This host's part of a global `[A, N, ...]` step batch and its `n_seq`: here
        single sequences, each host a consecutive share of every micro-batch's rows
        (`host_share`; one host: the whole batch). A method with paired rows overrides it."""
        return host_share(batch_A, self._host), self._host.stop - self._host.start

    def at_boundary(self) -> bool:
        return not self._queue

    def get_state(self) -> dict[str, Any]:
        return {"rollout": self.rollout, **self.controller_state()}

    def set_state(self, data_state: Mapping[str, Any] | None) -> None:
        if not data_state:
            return
        self.rollout = int(data_state["rollout"])
        self._queue = []
        self.load_controller(data_state)

    def example_step(self, trainer: Any, columns: Sequence[str]) -> StepBatch:
        """A host step batch shaped as the phase's updates (the longest prompt's bucket,
        zeros in `columns`), for `train(..., dry_run=True)` to lower the step it runs."""
        cfg = self.cfg
        width = sampling.bucket_length(
            max(len(p) for p in self.prompts), sampling.DEFAULT_PROMPT_BUCKETS
        )
        n = self._host.stop - self._host.start  # this host's rows, as the steps feed them
        m = cfg.max_new_tokens
        rows = batching.build_stacked([[1] * width] * n, [[1] * m] * n, width + m)
        self.scored_positions(trainer, rows, m)
        rows.update({k: np.zeros(rows["input_ids"].shape, np.float32) for k in columns})
        return StepBatch({k: np.stack([v] * cfg.grad_accum_steps) for k, v in rows.items()}, n)
