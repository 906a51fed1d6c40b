"""What a valid run config is: the value rules checked at start-up, before any model or dataset is built, and
which keys a resumed run may change from the config its checkpoint was written with.

Each rule names one key, the values it takes (as the error message states them) and a test; a key absent
from the config is not checked, and keys no rule names are left alone, so new config keys need no change here
(add a rule for them). Every problem is reported at once, each naming its key and the valid values.
A learning rate outside the range the model config recommends (``model.recommended``) is a note, not an error:
tiny-model rates on a real model, or the reverse, are legal but rarely meant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

import tunelab.data.pipeline  # noqa: F401  (imports every module that registers a data.ordering)
from tunelab.data.sampler import ORDERINGS
from tunelab.trainers.attention import attention_problem
from tunelab.trainers.config_schema import RunConfig
from tunelab.trainers.liger import liger_problem
from tunelab.trainers.models import DTYPES
from tunelab.trainers.optim import OPTIMIZERS, SCHEDULERS
from tunelab.trainers.tracking import TRACKERS
from tunelab.trainers.vllm_sync import vllm_problem

_ABSENT = object()

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value outside what its key takes, or a resume whose config differs where it must not."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer_at_least(minimum: int) -> Callable[[Any], bool]:
    return lambda value: _is_int(value) and value >= minimum


def optional(accepts: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or accepts(value)


def one_of(*values) -> Callable[[Any], bool]:
    return lambda value: any(value is v or (value == v and type(value) is type(v)) for v in values)


@dataclass(frozen=True)
class Rule:
    key: str
    valid: str
    accepts: Callable[[Any], bool]


def _choices(*values) -> str:
    return "one of " + ", ".join("null" if v is None else str(v) for v in values)


RULES: tuple[Rule, ...] = (
    Rule("train.global_batch_size", "an integer > 0", integer_at_least(1)),
    Rule("train.micro_batch_size", "an integer > 0", integer_at_least(1)),
    Rule("train.eval_batch_size", "an integer > 0", integer_at_least(1)),
    Rule("train.eval_samples", "an integer >= 0 (0 = no samples)", integer_at_least(0)),
    Rule("train.eval_sample_tokens", "an integer > 0", integer_at_least(1)),
    Rule("train.epochs", "an integer > 0", integer_at_least(1)),
    Rule("train.max_steps", "null (use train.epochs) or an integer > 0", optional(integer_at_least(1))),
    Rule("train.log_every", "an integer > 0 (steps)", integer_at_least(1)),
    Rule("train.save_every", "an integer > 0 (steps; the final state is always saved)", integer_at_least(1)),
    Rule("train.eval_every", "an integer >= 0 (steps; 0 = only before and after training)", integer_at_least(0)),
    Rule("train.keep_last", "an integer >= 0 (0 keeps every checkpoint)", integer_at_least(0)),
    Rule("train.attention_tile", "an integer > 0", integer_at_least(1)),
    Rule("train.sequence_parallel", "an integer > 0 (1 = off)", integer_at_least(1)),
    Rule("train.logits_chunk_size", "an integer > 0", integer_at_least(1)),
    Rule("train.lr", "a number > 0", lambda v: _is_number(v) and v > 0),
    Rule("train.on_nonfinite", _choices("stop", "skip"), one_of("stop", "skip")),
    Rule("train.optimizer", _choices(*OPTIMIZERS), one_of(*OPTIMIZERS)),
    Rule("train.scheduler", _choices(*SCHEDULERS), one_of(*SCHEDULERS)),
    # YAML reads a bare `no` as false, hence the quotes in the message
    Rule("train.mixed_precision", 'one of "no" (quoted in YAML), bf16, fp16, auto, null',
         one_of("no", "bf16", "fp16", "auto", None)),
    Rule("model.dtype", _choices(*DTYPES), one_of(*DTYPES)),
    Rule("data.eval_fraction", "a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    Rule("data.ordering", _choices(*ORDERINGS), one_of(*ORDERINGS)),
    Rule("train.eval_at_start", _choices(True, False), one_of(True, False)),
    Rule("reference.update_every", "an integer >= 0 (steps; 0 = a fixed reference)", integer_at_least(0)),
    Rule("reference.update_alpha", "a number in (0, 1] (1 = hard update)", lambda v: _is_number(v) and 0 < v <= 1),
    Rule("rounds.count", "an integer >= 0 (0 = an ordinary run)", integer_at_least(0)),
    Rule("rounds.samples", "an integer > 0", integer_at_least(1)),
    Rule("rounds.pairs", _choices("best_worst", "gold_vs_generated"), one_of("best_worst", "gold_vs_generated")),
    Rule("rounds.reference", _choices("round_start", "initial", "none"), one_of("round_start", "initial", "none")),
    Rule("rounds.backend", _choices("transformers", "vllm"), one_of("transformers", "vllm")),
    Rule("online.samples_per_prompt", "an integer >= 2 (a pair needs two samples)", integer_at_least(2)),
    Rule("online.max_new_tokens", "an integer > 0", integer_at_least(1)),
    Rule("online.batch_size", "an integer > 0", integer_at_least(1)),
    Rule("online.temperature", "a number > 0 (0 would sample one greedy answer twice: every pair a tie)",
         lambda v: _is_number(v) and v > 0),
    Rule("online.top_p", "a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    Rule("online.reward_dtype", _choices(*DTYPES), one_of(*DTYPES)),
    Rule("online.backend", _choices("transformers", "vllm"), one_of("transformers", "vllm")),
    Rule("online.vllm_gpu_memory_utilization", "a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1),
    Rule("online.vllm_dtype", _choices(*DTYPES), one_of(*DTYPES)),
    Rule("train.trackers", "a list of any of " + ", ".join(TRACKERS) + " (or null)",
         lambda v: v is None or (OmegaConf.is_list(v) or isinstance(v, list)) and all(n in TRACKERS for n in v)),
)


def _batch_sizes_divide(cfg) -> str | None:
    global_size = OmegaConf.select(cfg, "train.global_batch_size")
    micro = OmegaConf.select(cfg, "train.micro_batch_size")
    if _is_int(global_size) and _is_int(micro) and micro > 0 and global_size % micro:
        return (f"train.global_batch_size={global_size} is not a multiple of train.micro_batch_size={micro} "
                "(global = micro x processes x accumulation steps)")
    return None


def _latest_needs_a_run(cfg) -> str | None:
    if OmegaConf.select(cfg, "resume") == "latest" and not OmegaConf.select(cfg, "output_dir"):
        return ("resume=latest needs output_dir=<the run to continue> (without it a new, empty run directory is "
                "made); resume=auto starts fresh there instead")
    return None


def lr_range_note(cfg) -> str | None:
    """A note when train.lr lies outside the model config's ``recommended.lr_range`` (``lora_lr_range`` for a
    LoRA run), naming the model's own rates; None when inside, or when the model config gives no range."""
    lr = OmegaConf.select(cfg, "train.lr")
    lora = bool(OmegaConf.select(cfg, "model.lora.enabled"))
    key = "lora_lr_range" if lora else "lr_range"
    bounds = OmegaConf.select(cfg, f"model.recommended.{key}")
    if not _is_number(lr) or bounds is None:
        return None
    low, high = bounds
    if low <= lr <= high:
        return None
    model = OmegaConf.select(cfg, "model.gguf_file") or OmegaConf.select(cfg, "model.name_or_path") or \
        OmegaConf.select(cfg, "model.source")
    rates = OmegaConf.select(cfg, "model.recommended")
    return (f"note: train.lr={lr:g} is outside the range model {model} trains well at "
            f"(model.recommended.{key}: {low:g} to {high:g}{' with LoRA' if lora else ''}); its own rates are "
            f"{rates.sft_lr:g} for SFT and {rates.preference_lr:g} for preference losses. The run goes on")


def _updated_reference_is_a_copy(cfg) -> str | None:
    every, strategy = OmegaConf.select(cfg, "reference.update_every"), OmegaConf.select(cfg, "reference.strategy")
    if _is_int(every) and every > 0 and strategy != "frozen_copy":
        return (f"reference.update_every={every} (TR-DPO) moves the reference during training, which needs "
                f"reference.strategy=frozen_copy, not {strategy} (precomputed log-probs and the adapter-disabled "
                "policy cannot change)")
    return None


def _recommended_is_valid(cfg) -> str | None:
    recommended = OmegaConf.select(cfg, "model.recommended", default=None)
    if recommended is None:
        return None
    problems = []
    for key in ("lr_range", "lora_lr_range"):
        bounds = recommended.get(key)
        if bounds is not None and not (OmegaConf.is_list(bounds) and len(bounds) == 2
                                       and all(_is_number(b) and b > 0 for b in bounds) and bounds[0] < bounds[1]):
            shown = OmegaConf.to_object(bounds) if OmegaConf.is_config(bounds) else bounds
            problems.append(f"model.recommended.{key}={shown!r} is invalid: valid values are [low, high], "
                            "two numbers with 0 < low < high")
    return "; ".join(problems) or None


def _rounds_are_complete(cfg) -> str | None:
    count = OmegaConf.select(cfg, "rounds.count", default=0)
    if not _is_int(count) or count == 0:
        return None
    problems = []
    if not OmegaConf.select(cfg, "rounds.prompts.path", default=None):
        problems.append(f"rounds.count={count} needs rounds.prompts.path (the prompts each round generates for)")
    rates = OmegaConf.select(cfg, "rounds.lr", default=None)
    if rates is not None and not (OmegaConf.is_list(rates) and len(rates) == count and all(
            _is_number(r) and r > 0 for r in rates)):
        problems.append(f"rounds.lr={rates!r} is invalid: valid values are null or {count} numbers > 0, one per round")
    return "; ".join(problems) or None


def _kernels_run_here(cfg) -> str | None:
    """The attention implementation and Liger's kernels need what this machine may lack (CUDA, a package)."""
    problems = [attention_problem(OmegaConf.select(cfg, "model.attn_implementation", default="tiled_sdpa"))]
    if OmegaConf.select(cfg, "model.liger", default=False):
        problems.append(liger_problem())
    return "; ".join(p for p in problems if p) or None


def _online_is_servable(cfg) -> str | None:
    """Online pairs exist only once their step draws them: the loss must be pairwise and the reference live. (The
    reward model that labels the samples is checked when the run starts, trainers/online.py: a shipped recipe
    cannot name one, and every shipped recipe passes this check.)"""
    if not OmegaConf.select(cfg, "online.enabled", default=False):
        return None
    from tunelab.losses import build_loss

    problems = []
    needs = build_loss(cfg.loss, cfg.get("pair_weighting")).needs
    if not needs.pairs or needs.unpaired:
        problems.append(f"online.enabled=true trains on sampled pairs, so the loss must be pairwise (dpo, simpo, ...); "
                        f"the recipe's loss terms {', '.join(cfg.loss)} need {needs.layout} data")
    strategy = OmegaConf.select(cfg, "reference.strategy")
    lora = bool(OmegaConf.select(cfg, "model.lora.enabled"))
    if needs.reference and (strategy == "precomputed" or (strategy == "auto" and not lora)):
        shown = "auto (precomputed without LoRA)" if strategy == "auto" else strategy
        problems.append(f"online.enabled=true with reference.strategy={shown}: precomputed log-probs exist only for "
                        "examples known before training, not for pairs sampled during it; set "
                        "reference.strategy=frozen_copy (or adapter_disabled with LoRA)")
    if OmegaConf.select(cfg, "rounds.count", default=0):
        problems.append("online.enabled=true and rounds.count > 0 are two ways of generating the training pairs; "
                        "choose one")
    if OmegaConf.select(cfg, "online.backend", default="transformers") == "vllm":
        problems.append(vllm_problem())
        if OmegaConf.select(cfg, "model.load_in_4bit", default=False):
            problems.append("online.backend=vllm with model.load_in_4bit=true: the 4-bit base would have to be "
                            "dequantized for every push; use online.backend=transformers with QLoRA")
    return "; ".join(p for p in problems if p) or None


def _sequence_parallel_is_servable(cfg) -> str | None:
    """What sharding a training forward's positions cannot serve; the process count, DeepSpeed and the model's heads
    are checked at start (trainers/sequence_parallel.enable_sequence_parallel)."""
    size = OmegaConf.select(cfg, "train.sequence_parallel", default=1)
    if not _is_int(size) or size <= 1:
        return None
    problems = []
    implementation = OmegaConf.select(cfg, "model.attn_implementation", default="tiled_sdpa")
    if implementation != "tiled_sdpa":
        problems.append(f"model.attn_implementation={implementation}: only tiled_sdpa takes the whole row's layout "
                        "through DeepSpeed's Ulysses wrapper, which drops dense masks")
    for key in ("train.neftune_alpha", "train.symnoise_alpha", "train.masked_thought"):
        if OmegaConf.select(cfg, key, default=None):
            problems.append(f"{key}: its noise is drawn per rank, so the ranks sharing a row would perturb it "
                            "differently; unset it")
    strategy = OmegaConf.select(cfg, "reference.strategy", default="auto")
    if strategy == "adapter_disabled" or (strategy == "auto" and OmegaConf.select(cfg, "model.lora.enabled")):
        # Reference.with_logps restores the mode it reads from a DeepSpeed engine, whose `training` stays True, so
        # the evaluation forward after it would run in train mode: sharded, while the ranks of a group hold different
        # eval batches
        problems.append("reference.strategy=adapter_disabled (auto with LoRA) leaves the policy in train mode during "
                        "evaluation under DeepSpeed; set reference.strategy=precomputed or frozen_copy")
    if OmegaConf.select(cfg, "online.enabled", default=False) or OmegaConf.select(cfg, "rounds.count", default=0):
        problems.append("online.enabled / rounds.count: each rank samples its own pairs, so the ranks of a group "
                        "would not hold the same micro-batches; train on a fixed dataset")
    return "; ".join(f"train.sequence_parallel={size}: {p}" for p in problems) or None


# checks that involve several keys; each returns a message or None
JOINT_RULES: tuple[Callable[[Any], str | None], ...] = (_kernels_run_here, _batch_sizes_divide, _latest_needs_a_run,
                                                        _recommended_is_valid,
                                                        _updated_reference_is_a_copy, _rounds_are_complete,
                                                        _online_is_servable, _sequence_parallel_is_servable)


def check_config(cfg) -> None:
    """Raise ConfigError listing every rule the config breaks; log a note for an lr outside the model's range."""
    problems, unresolved = [], False
    for rule in RULES:
        try:
            value = OmegaConf.select(cfg, rule.key, default=_ABSENT, throw_on_missing=False)
        except InterpolationResolutionError as err:
            unresolved = True
            problems.append(f"{rule.key} cannot be resolved ({str(err).splitlines()[0]}); the generic recipes take "
                            "the learning rate and micro-batch from the model config's `recommended` block (see "
                            "recipes/model/tiny.yaml)")
            continue
        if value is not _ABSENT and not rule.accepts(value):
            problems.append(f"{rule.key}={value!r} is invalid: valid values are {rule.valid}")
    if not unresolved:  # the joint rules read the same keys
        problems += [message for check in JOINT_RULES if (message := check(cfg))]
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    if note := lr_range_note(cfg):
        log.warning("%s", note)


# Keys (and key prefixes) a resumed run may change: where the run lives and how it is watched, its length,
# and settings that change speed or memory but not the numbers (a global batch gives the same update however
# it is split into micro-batches; chunk and tile sizes are exact). Everything else must match the checkpoint.
# model.recommended acts only through the train keys a recipe fills from it, which are compared themselves.
RESUME_MAY_CHANGE = (
    "output_dir", "resume", "export",
    "train.max_steps", "train.epochs",
    "train.log_every", "train.eval_every", "train.eval_at_start", "train.save_every", "train.keep_last",
    "train.eval_batch_size", "train.eval_samples", "train.eval_sample_tokens",
    "train.progress_bar", "train.plot", "train.trackers", "train.wandb_mode", "train.project",
    "train.micro_batch_size", "train.logits_chunk_size", "train.logits_keep_mb", "train.attention_tile",
    "model.gradient_checkpointing", "model.recommended", "data.num_proc", "reference.cache_dir",
    "online.vllm_gpu_memory_utilization",
)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def check_resume_compatible(saved: dict | None, current: dict, checkpoint: str) -> None:
    """Refuse to resume ``checkpoint`` (whose resolved config is ``saved``) under a config that differs in a key
    outside RESUME_MAY_CHANGE, naming each such key with both values."""
    if saved is None:
        raise ConfigError(f"{checkpoint} records no config, so it cannot be checked against this run's; resume from "
                          "a checkpoint written by this version of tunelab")
    # a key absent on one side holds its schema default there (keys added since the checkpoint was written behave
    # as before by default), else null
    defaults = _flatten(OmegaConf.to_container(OmegaConf.structured(RunConfig)))
    old, new = _flatten(saved), _flatten(current)
    differ = []
    for key in sorted(set(old) | set(new)):
        was, now = old.get(key, defaults.get(key)), new.get(key, defaults.get(key))
        if was != now and not _may_change(key):
            differ.append(f"{key}: {was!r} in the checkpoint, {now!r} now")
    if differ:
        raise ConfigError(
            f"cannot resume from {checkpoint}: it was written with another config ("
            + "; ".join(differ) + "). A resumed run may change only " + ", ".join(RESUME_MAY_CHANGE)
            + "; to change the others start a new run (another output_dir, without resume)"
        )
