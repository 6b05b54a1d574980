"""Default DPO run: every field `dpo-jax train` understands, with TRL-like defaults.

    dpo-jax train --config dpo_jax/configs/default.py \
        --config.model.path=/path/to/hf_model --config.data.train=/path/train.jsonl

`get_config(arg)`: `arg` is an optional loss name (`default.py:ipo`).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from dpo_jax.sharding import LOGICAL_AXIS_RULES


def default_cache_dir() -> str:
    """The tokenized-data cache's default: `$XDG_CACHE_HOME/dpo_jax/tokenized`, or
    `~/.cache/dpo_jax/tokenized` (read when asked, so a test run or a job can move it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dpo_jax", "tokenized")


def data_spec() -> dict[str, Any]:
    """Every key a data spec (`dpo_jax.data.load_preference_data`) reads, with its
    default: the `data` section's reading keys, and those only a spec sets
    (`dpo_jax.data.complete_spec` fills a partial spec from here)."""
    d = get_config().data
    return dict(
        # where: `sources` (paths, globs or source dicts), else `path`, else spec[split]
        sources=None, path=None, train=d.train, eval=d.eval,
        format=d.format,
        sft=False,  # SFT rows (objective.name="sft") instead of preference rows
        unpaired=False,  # pairs become unpaired rows (chosen desirable, rejected not)
        prompts=False,  # any kind's prompts (`load_prompts`, the rollouts' prompt pool)
        limit=None,  # N: only the first N examples
        max_length=d.max_length, max_prompt_length=d.max_prompt_length,
        max_completion_length=None,  # None: no completion limit
        truncation_mode=d.truncation_mode,
        add_eos=True,  # end each completion with EOS (as TRL)
        skip_bad_rows=d.skip_bad_rows, cache_dir=d.cache_dir,
        # string sources (`data.sources.parse_spec`): Hub fetches, TFDS's data directory
        allow_downloads=get_config().allow_downloads, tfds_data_dir=d.tfds_data_dir,
    )  # fmt: skip


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The full config tree with defaults."""
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/dpo"  # metrics.jsonl, tensorboard/, config.json, checkpoints/
    c.seed = 0
    # Fetch Hub names that are not in the local Hugging Face cache: model.path=org/name
    # and data.train=hf:org/name (huggingface_hub snapshots). False: the cache only.
    c.allow_downloads = False

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # Hugging Face directory (config.json + *.safetensors)
    c.model.dtype = "bfloat16"  # compute dtype; params and optimizer state stay float32
    c.model.param_dtype = "float32"
    c.model.remat = ""  # "" keeps the checkpoint's default; "none" | "block" | "dots_saveable"
    # nn.scan over the blocks: one compiled block (fast compile) and, on XLA:CPU, no
    # backward fusion across layers (benchmarks/README.md); params stacked per layer.
    c.model.scan_layers = True
    # Attention: auto | xla | blockwise | cudnn | splash | ring | ulysses (models.attention).
    # auto: cuDNN on GPU, splash on TPU, on CPU dense below 1024 tokens and blockwise above;
    # ring (and auto) when mesh.sequence > 1: context parallelism (models/ring_attention.py),
    # ulysses: its all-to-all variant (heads divisible by mesh.sequence, else the ring);
    # a backend that cannot serve a batch falls back to blockwise with a logged reason.
    c.model.attention = "auto"
    c.tokenizer = ""  # default: model.path

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # file / glob / source spec the data package reads
    c.data.eval = ""  # held-out split ("" = no evaluation)
    # data.train / data.eval: a file, glob, save_to_disk folder, hf:NAME[:SPLIT] (a Hub
    # dataset org/name or a save_to_disk folder) or tfds:NAME[/CONFIG][:SPLIT]
    c.data.tfds_data_dir = ""  # tfds: specs' prepared data ("" = TFDS's default)
    c.data.format = "auto"
    c.data.max_length = (
        1024  # prompt + completion tokens per sequence (TRL 1.16: 1024); None: no limit
    )
    c.data.max_prompt_length = None  # None: no prompt limit (TRL 1.16 has none); N: keep its last N
    # keep_start (TRL 1.16's default): each sequence keeps its first max_length tokens;
    # keep_end (TRL, deprecated there): each sequence keeps its last max_length tokens;
    # keep_end_prompt: drop the shared prompt's start first (prefix_shared-friendly).
    c.data.truncation_mode = "keep_start"
    c.data.layout = "stacked"  # stacked | packed | prefix_shared
    c.data.shuffle = True
    c.data.skip_bad_rows = False
    c.data.cache_dir = default_cache_dir()  # tokenized-data cache: a dir or gs://...; "" = off
    c.data.num_eval_examples = -1  # -1 = the whole eval split

    c.batch_size = 64  # preference pairs per optimizer update, all hosts together
    c.grad_accum_steps = 1  # micro-batches per update (A); batch_size % A == 0
    c.num_steps = -1  # -1: num_epochs over the training set
    c.num_epochs = 1.0

    # What the Trainer minimises (dpo_jax/objectives.py): "preference" (loss.* below, any
    # paired or unpaired loss), "sft" (token NLL over data.train's SFT rows: {"text"},
    # {"prompt", "completion"} or {"messages"}), "reward_model" (Bradley-Terry on pairs,
    # a scalar head on the last token's hidden state).
    c.objective = ml_collections.ConfigDict()
    c.objective.name = "preference"
    # reward_model: TRL's center_rewards_coefficient * mean((r_c + r_r)^2); 0 = off
    c.objective.center_rewards_coefficient = 0.0

    c.loss = ml_collections.ConfigDict()
    # One name in dpo_jax.losses.names() or a mix, TRL's loss_type list: a list, or on the
    # command line "['sigmoid','sft']" / "sigmoid,sft" (losses.parse_loss_spec). Typed
    # `object` so a config file may assign a list; weights: None = all 1.0 (loss_weights).
    c.loss.name = ml_collections.FieldReference(arg or "sigmoid", field_type=object)
    c.loss.weights = ml_collections.FieldReference(None, field_type=object)
    # Keyword arguments of the loss function: --config.loss.hyper.KEY=V sets any argument
    # the loss takes (a new key is added; a key the loss does not take is refused by name).
    c.loss.hyper = ml_collections.ConfigDict({"beta": 0.1})

    c.reference = ml_collections.ConfigDict()
    # auto: "none" for reference-free losses, "precomputed" when the data carries
    # ref_chosen_logps/ref_rejected_logps, else "frozen".
    # cache: compute the reference log-probs in a first pass, cache them in the run dir.
    # adapters_off (LoRA): the policy with its adapters disabled; auto picks it with LoRA.
    c.reference.mode = "auto"  # auto | frozen | precomputed | cache | none | adapters_off
    c.reference.path = ""  # a different reference checkpoint ("" = the initial policy)
    # Use precomputed ref columns that carry no `ref_logps_fingerprint` (from TRL or an
    # older dpo-jax); by default they are refused (docs/CONTRACTS.md, reference columns).
    c.reference.trust_precomputed = False
    c.reference.ref_model_sync_steps = 0  # TR-DPO: >0 soft-updates the reference
    c.reference.ref_model_mixup_alpha = 0.6

    # LoRA (dpo_jax/lora.py): train low-rank adapters beside the frozen base weights.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = off (full fine-tuning)
    c.lora.alpha = 16.0  # update scale alpha / rank, as PEFT
    c.lora.targets = "all-linear"  # comma list of q,k,v,o,gate,up,down,embed,lm_head
    # "" keeps model.param_dtype; "bfloat16" halves the frozen base; "int8" quantises its
    # linear kernels (per-channel scales, dequantised per layer in the forward)
    c.lora.base_dtype = ""

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # adamw | rmsprop | sgd
    c.optim.learning_rate = 1e-6  # TRL DPOConfig's default
    c.optim.warmup_steps = 0
    c.optim.schedule = "linear"  # constant | linear | cosine
    c.optim.final_lr_fraction = 0.0
    c.optim.weight_decay = 0.0
    c.optim.max_grad_norm = 1.0  # <= 0: no clipping
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.decay = 0.99  # rmsprop
    c.optim.momentum = 0.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = the devices left over
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Context parallelism: activations' length split over this many devices; with
    # model.attention auto or ring, attention runs as a ring (models/ring_attention.py).
    c.mesh.sequence = 1
    c.mesh.multihost = "auto"  # auto | true | false: jax.distributed.initialize()
    # (logical axis, mesh axes) pairs: shards params, optimizer state, reference, activations
    c.mesh.rules = LOGICAL_AXIS_RULES

    c.train = ml_collections.ConfigDict()
    c.train.log_every = 10
    c.train.eval_every = 0  # 0 = only at the end (when data.eval is set)
    c.train.nan_policy = "stop"  # stop | skip
    # skip: stop like "stop" once more than this fraction of the steps so far (and more
    # than train.MIN_SKIPS_BEFORE_STOP steps) were skipped.
    c.train.max_skipped_fraction = 0.1
    c.train.logps_chunk_size = 0  # > 0: chunked unembedding, no [N, L, V] logits
    c.train.unembed_scored_only = True  # unembed only positions that predict a scored token
    # TRL's entropy, logits/chosen, logits/rejected, mean_token_accuracy (paired losses)
    c.train.token_metrics = True
    c.train.progress = True
    c.train.tensorboard = True
    # More metric loggers beside metrics.jsonl and TensorBoard (TRL's report_to): "wandb"
    # (Weights & Biases: pip install -e '.[wandb]'; WANDB_PROJECT, WANDB_MODE=offline, ...)
    c.train.report_to = ""

    c.checkpoint = ml_collections.ConfigDict()
    # On, as TRL saves every 500 steps: `dpo-jax export` reads the run's last checkpoint
    c.checkpoint.enabled = True
    c.checkpoint.save_every = 500
    c.checkpoint.keep_last = 3  # <= 0 keeps all
    c.checkpoint.keep_every = 0  # > 0: also never delete steps divisible by this
    c.checkpoint.force_resume = False  # resume despite math-changing config differences
    c.checkpoint.async_save = True
    c.checkpoint.export_hf = False  # write run_dir/hf at the end (needs checkpoint.enabled)

    # On-policy training (objectives ppo, grpo, rloo, online_dpo; docs/ONLINE.md): what
    # every method shares. Rollouts are sampled from the current policy with the
    # KV-cache sampler, rewarded or judged, scored, and trained on by the one loop.
    c.online = ml_collections.ConfigDict()
    c.online.num_rollouts = 100  # the phase's length: optimizer steps = this x updates/rollout
    c.online.rollout_batch_size = 64  # completions per rollout, all hosts together
    c.online.samples_per_prompt = 1  # TRL num_generations (GRPO and RLOO need >= 2)
    c.online.max_new_tokens = 24
    c.online.temperature = 1.0  # PPO, GRPO and RLOO sample the policy itself (1.0)
    c.online.num_mini_batches = 1  # optimizer updates per pass over a rollout
    c.online.kl_coef = 0.05  # beta of the KL to the reference (PPO: the controller's start)
    # The rollouts' reward for `dpo-jax train` (the Python API may pass reward= instead):
    # "vader" | "hf:DIR" (a sequence classifier: a 1-label one's logit, else P(class 1))
    # on the decoded prompt + completion, "reward_model:DIR" (`dpo-jax export` of an
    # objective.name=reward_model run), "python:MODULE:FUNCTION" (TRL reward_funcs:
    # fn(prompts=, completions=) -> floats); several comma-separated, weighted by reward_weights (TRL reward_weights).
    c.online.reward = ""
    c.online.reward_weights = ml_collections.FieldReference(None, field_type=object)
    # Online DPO's pairwise judge instead of a reward: "python:MOD:FN", "llm:hf:DIR",
    # "llm:python:MOD:FN" (dpo_jax.reward_sources.judge_from_spec).
    c.online.judge = ""
    # Subtracted from the score of a completion that did not end with EOS (TRL's
    # missing_eos_penalty); None: no penalty.
    c.online.missing_eos_penalty = ml_collections.FieldReference(None, field_type=float)

    # GRPO and RLOO (objective.name="grpo" | "rloo", dpo_jax/group_loop.py): no critic;
    # group-normalised (GRPO, Shao et al. 2024) or leave-one-out (RLOO, Ahmadian et al.
    # 2024) advantages over online.samples_per_prompt completions per prompt, a clipped
    # ratio. GRPO's KL is a k3 loss term weighted by online.kl_coef (0 allowed); RLOO's is
    # in the reward. Defaults: TRL's GRPOConfig (num_iterations 1, epsilon 0.2).
    c.grpo = ml_collections.ConfigDict()
    c.grpo.num_iterations = 1  # passes over each rollout (TRL num_iterations, the paper's mu)
    c.grpo.epsilon_low = 0.2  # ratio clip below 1
    c.grpo.epsilon_high = 0.2  # above 1; DAPO's clip-higher: 0.28
    # "grpo": mean of per-sequence token means; "dapo" (= "bnpo" per micro-batch): token
    # mean over the optimizer batch; "dr_grpo": token sum / (sequences x max_new_tokens)
    c.grpo.loss_type = "grpo"
    c.grpo.scale_rewards = "group"  # GRPO: / group std; "batch": / batch std; "none": Dr. GRPO
    c.grpo.dynamic_sampling = False  # DAPO: drop groups whose rewards are all equal

    # Online DPO (objective.name="online_dpo", dpo_jax/online_dpo.py): per prompt,
    # online.samples_per_prompt completions of the current policy, the best and worst by
    # the reward (or a judge) as a pair, trained with loss.name (any paired loss).
    c.online_dpo = ml_collections.ConfigDict()
    c.online_dpo.label = "argmax"  # "argmax" | "bradley_terry" (chosen ~ sigmoid(r_a - r_b))

    # PPO (objective.name="ppo", dpo_jax/ppo_loop.py, docs/PPO.md): a value head on the
    # policy, a per-token KL penalty against the reference, GAE. Defaults: TRL's
    # PPOConfig (fixed kl_coef, 4 epochs, clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1,
    # lambda 0.95).
    c.ppo = ml_collections.ConfigDict()
    c.ppo.num_epochs = 4  # PPO epochs over each rollout
    # None: fixed online.kl_coef. A KL in nats per sequence: Ziegler et al.'s adaptive
    # controller, kl_coef *= 1 + clip(KL / target_kl - 1, -0.2, 0.2) * episodes / horizon
    c.ppo.target_kl = ml_collections.FieldReference(None, field_type=float)
    c.ppo.kl_horizon = 10000.0
    c.ppo.kl_estimator = "k1"  # k1: log p - log q; k3: (q/p - 1) - log(q/p)
    c.ppo.gamma = 1.0
    c.ppo.lam = 0.95
    c.ppo.whiten_rewards = False  # rescale per-token rewards to unit std (mean kept)
    c.ppo.whiten_advantages = True
    c.ppo.clip = 0.2  # policy ratio clip
    c.ppo.value_clip = 0.2
    c.ppo.vf_coef = 0.1
    return c
