"""SFTMix data side (Xiao et al. 2024, arXiv 2410.05248; docs/methods_sftmix.md): confidence, split, pairing.

Stage 1, confidence. A reference model is trained with plain NTP and keeps several checkpoints. For every
training example and every chosen checkpoint c, the perplexity of the response given the prompt is
``PPL_c = exp(-(1/|y|) sum_t log p_c(y_t | x, y_<t))`` over the labelled (response) tokens, and
``Conf = -(1/C) sum_c PPL_c`` (the mean negative perplexity). ``score_run`` computes it with the chunked
forward the trainer uses (no full-vocabulary log-softmax) and stores it in ``<run>/sftmix_confidence.json``
under the content fingerprint of the tokenized train dataset, so a later run can check that the scores belong
to exactly the dataset it builds.

Stage 2, split (the ``sftmix_split`` examples stage). The train dataset gets ``confidence`` and ``group``
columns: the top ``split_ratio`` fraction by confidence is confident (group 1, D_c), the rest unconfident
(group 0, D_u); ties go to the lower index. Eval data is left alone (no groups), so the eval loss stays the
plain NTP loss and is comparable with an SFT baseline.

Pairing (the ``sftmix_pairs`` ordering of ``data/sampler.py``). Each epoch both halves are shuffled from
(seed, epoch) and interleaved as ``c0, u0, c1, u1, ...``; micro-batches are contiguous slices of an even
size, so every micro-batch holds whole (confident, unconfident) pairs and the collator's ``seq_group`` shows
the alternation the ``sftmix`` loss checks. An epoch has ``len(dataset) // 2`` pairs: with halves of
unequal size (``split_ratio != 0.5``) the larger half is truncated to that many (a different subset each
epoch) and the smaller one is repeated, each repetition freshly shuffled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time

import torch

from data.fingerprint import dataset_fingerprint
from data.sampler import ORDERINGS
from data.stages import register_stage

log = logging.getLogger(__name__)

CONFIDENCE_FILE = "sftmix_confidence.json"
STAGE_NAME = "sftmix_split"
CONFIDENT, UNCONFIDENT = 1, 0


# ---- confidence ---------------------------------------------------------------------------------------------
def response_token_counts(dataset) -> list[int]:
    """Labelled tokens per SFT example, counted as the collator counts them (no label on the first token)."""
    return [int(sum(mask[1:])) for mask in dataset["target_mask"]]


def perplexities(seq_logps: list[float], counts: list[int]) -> list[float]:
    """exp of the token-mean NLL of each response."""
    return [math.exp(-lp / max(n, 1)) for lp, n in zip(seq_logps, counts)]


def confidence(ppl_per_checkpoint: list[list[float]]) -> list[float]:
    """Conf = mean over checkpoints of -PPL."""
    if not ppl_per_checkpoint:
        raise ValueError("no checkpoints to average confidence over")
    n_ckpt = len(ppl_per_checkpoint)
    return [-sum(values) / n_ckpt for values in zip(*ppl_per_checkpoint)]


def select_checkpoints(run_dir: str, spec="all") -> list[str]:
    """Checkpoint directories of a finished run: ``all``, ``last_K``, or a list of names / step numbers."""
    from trainers.checkpoint import PREFIX, checkpoint_dir, complete_checkpoints

    found = complete_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{checkpoint_dir(run_dir)} has no complete checkpoint (step_*/ with trainer_state)")
    if isinstance(spec, str) and spec == "all":
        return found
    if isinstance(spec, str) and re.fullmatch(r"last_\d+", spec):
        k = int(spec.split("_")[1])
        if k < 1:
            raise ValueError("checkpoints=last_K needs K >= 1")
        return found[-k:]
    if isinstance(spec, (int, str)):
        spec = [s for s in str(spec).strip("[]").split(",") if s.strip()]
    by_name = {os.path.basename(p): p for p in found}
    chosen = []
    for item in spec:
        item = str(item).strip()
        name = item if item.startswith(PREFIX) else f"{PREFIX}{int(item):07d}"
        if name not in by_name:
            raise FileNotFoundError(f"checkpoint {item!r} not in {checkpoint_dir(run_dir)}; have: {', '.join(by_name)}")
        chosen.append(by_name[name])
    return chosen


def _scoring_data_cfg(data_cfg):
    """The data config without the ``sftmix_split`` stage (and anything after it): the dataset that stage sees."""
    from omegaconf import OmegaConf

    data_cfg = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
    stages = list(data_cfg.get("stages") or [])
    names = [s.get("name") for s in stages]
    if STAGE_NAME in names:
        data_cfg.stages = stages[:names.index(STAGE_NAME)]
    return data_cfg


def read_model_state(checkpoint: str) -> dict:
    """The model state of an Accelerate checkpoint, keyed like the ``CausalLMWithLogProbs`` wrapper.

    ``model.safetensors`` (single process / DDP, the tested path) or ``pytorch_model*.bin``; DeepSpeed
    (``pytorch_model/``) and FSDP sharded (``pytorch_model_fsdp_0/``) states are consolidated on the fly with
    DeepSpeed's ``zero_to_fp32`` and torch's ``dcp_to_torch_save`` (not exercised by the tests).
    """
    path = os.path.join(checkpoint, "model.safetensors")
    if os.path.isfile(path):
        from safetensors.torch import load_file

        return load_file(path)
    for name in ("pytorch_model.bin", "pytorch_model_fsdp.bin"):
        if os.path.isfile(os.path.join(checkpoint, name)):
            return torch.load(os.path.join(checkpoint, name), map_location="cpu", weights_only=True)
    if os.path.isdir(os.path.join(checkpoint, "pytorch_model")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag="pytorch_model")
        return {k.removeprefix("module."): v for k, v in state.items()}
    if os.path.isdir(os.path.join(checkpoint, "pytorch_model_fsdp_0")):
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(os.path.join(checkpoint, "pytorch_model_fsdp_0"), os.path.join(tmp, "state.pt"))
            state = torch.load(os.path.join(tmp, "state.pt"), map_location="cpu", weights_only=True)
        return state.get("model", state)
    raise FileNotFoundError(f"{checkpoint}: no model state found (model.safetensors, pytorch_model*.bin, "
                            "pytorch_model/ or pytorch_model_fsdp_0/)")


def load_checkpoint_weights(wrapper: torch.nn.Module, checkpoint: str) -> None:
    """Load a checkpoint's model state into the ``CausalLMWithLogProbs`` wrapper (tied weights may be absent)."""
    state = read_model_state(checkpoint)
    path = checkpoint
    missing, unexpected = wrapper.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyError(f"{path}: unexpected keys for this model config, e.g. {unexpected[:3]}")
    params = dict(wrapper.named_parameters(remove_duplicate=False))
    loaded = {params[name].data_ptr() for name in state if name in params}
    untied = [name for name in missing if name in params and params[name].data_ptr() not in loaded]
    if untied:
        raise KeyError(f"{path}: missing weights {untied[:3]} (not tied to a loaded weight)")


def score_run(run_dir: str, checkpoints="all", overrides=(), output: str | None = None,
              batch_size: int | None = None, force: bool = False) -> str:
    """Stage 1: confidence of every train example under the chosen checkpoints of a finished NTP run.

    The model and data come from ``<run_dir>/config.yaml`` (``overrides``: OmegaConf dotlist applied on top,
    e.g. ``data.sources.0.num_rows=400``). Returns the path of the scores file.
    """
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from data.collate import Collator
    from data.pipeline import build_datasets
    from trainers.forward import CausalLMWithLogProbs
    from trainers.models import build_model, build_tokenizer
    from trainers.reference import weights_fingerprint
    from trainers.scoring import score_examples

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: run_dir must be a finished tunelab run directory")
    cfg = OmegaConf.load(cfg_path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    chosen = select_checkpoints(run_dir, checkpoints)
    output = output or os.path.join(run_dir, CONFIDENCE_FILE)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())

    tokenizer = build_tokenizer(cfg.model)
    data_cfg = _scoring_data_cfg(cfg.data)
    with accelerator.main_process_first():
        train_ds, _, _ = build_datasets(data_cfg, tokenizer, "sft", cfg.seed)
    fingerprint = dataset_fingerprint(train_ds)
    counts = response_token_counts(train_ds)
    store = read_scores(output) if os.path.isfile(output) else {}
    entry = store.get(fingerprint, {})
    known = {} if force else entry.get("perplexity", {})

    collator = Collator("sft", packing=cfg.data.packing, shared_prompt=cfg.data.shared_prompt,
                        row_length=cfg.data.max_length)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    wrapper = CausalLMWithLogProbs(model, cfg.train.logits_chunk_size).to(accelerator.device)
    per_checkpoint = {}
    for path in chosen:
        name = os.path.basename(path)
        load_checkpoint_weights(wrapper, path)
        weights = weights_fingerprint(wrapper)
        cached = known.get(name)
        if cached and cached.get("weights") == weights and len(cached["values"]) == len(train_ds):
            per_checkpoint[name] = cached
            log.info("sftmix confidence: %s cached", name)
            continue
        start = time.time()
        if accelerator.is_main_process:
            log.info("sftmix confidence: scoring all %d train examples under %s (the split ranks every example)",
                     len(train_ds), name)
        logps = score_examples(accelerator, wrapper, train_ds, collator, batch_size or cfg.train.eval_batch_size,
                               description=f"sftmix confidence ({name})", progress=cfg.train.progress_bar)
        values = perplexities([sum(v) for v in logps], counts)
        per_checkpoint[name] = {"weights": weights, "values": values}
        log.info("sftmix confidence: %s scored %d examples in %.1fs (mean PPL %.3f)", name, len(values),
                 time.time() - start, sum(values) / len(values))
    names = [os.path.basename(p) for p in chosen]
    entry = {
        "num_examples": len(train_ds),
        "checkpoints": names,
        "confidence": confidence([per_checkpoint[n]["values"] for n in names]),
        "perplexity": {**known, **per_checkpoint},
        "run_dir": os.path.abspath(run_dir),
        "seed": int(cfg.seed),
    }
    if accelerator.is_main_process:
        store[fingerprint] = entry
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        tmp = f"{output}.tmp{os.getpid()}"
        with open(tmp, "w") as handle:
            json.dump(store, handle)
        os.replace(tmp, output)
        log.info("sftmix confidence of %d examples (fingerprint %s, checkpoints %s) -> %s", len(train_ds),
                 fingerprint, ", ".join(names), output)
    accelerator.wait_for_everyone()
    return output


def read_scores(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


# ---- split -------------------------------------------------------------------------------------------------
def split_groups(conf: list[float], split_ratio: float = 0.5) -> list[int]:
    """1 for the top ``split_ratio`` fraction by confidence (ties: lower index first), else 0."""
    n = len(conf)
    if not 0.0 < split_ratio < 1.0:
        raise ValueError(f"sftmix split_ratio must be in (0, 1), got {split_ratio}")
    n_confident = int(round(split_ratio * n))
    if not 0 < n_confident < n:
        raise ValueError(f"sftmix split_ratio={split_ratio} of {n} examples leaves an empty half")
    ranked = sorted(range(n), key=lambda i: (-conf[i], i))
    groups = [UNCONFIDENT] * n
    for i in ranked[:n_confident]:
        groups[i] = CONFIDENT
    return groups


def _scores_path(scores: str) -> str:
    return os.path.join(scores, CONFIDENCE_FILE) if os.path.isdir(scores) else scores


@register_stage(STAGE_NAME, "examples")
def sftmix_split(dataset, split: str, seed: int, context: dict | None = None, scores: str | None = None,
                 split_ratio: float = 0.5):
    """Add ``confidence`` and ``group`` to the train examples from a stage-1 scores file (run dir or path)."""
    if split != "train":
        return dataset
    if not scores:
        raise ValueError("data stage sftmix_split needs `scores`: the stage-1 reference run dir or its "
                         f"{CONFIDENCE_FILE} (recipe=sftmix: set sftmix.reference_run=<run dir>)")
    path = _scores_path(str(scores))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"SFTMix confidence scores not found at {path}. Run stage 1 first: "
            f"python scripts/sftmix_score.py run_dir=<reference run dir>"
        )
    fingerprint = dataset_fingerprint(dataset)
    store = read_scores(path)
    if fingerprint not in store:
        raise ValueError(
            f"{path} has no confidence scores for this train dataset (fingerprint {fingerprint}; the file has "
            f"{', '.join(store) or 'none'}). The scores were computed on different tokenized data: use the same "
            "data config, seed and tokenizer as the reference run, or re-run scripts/sftmix_score.py with "
            "matching overrides."
        )
    entry = store[fingerprint]
    conf = entry["confidence"]
    if len(conf) != len(dataset):
        raise ValueError(f"{path}: {len(conf)} scores for {len(dataset)} examples")
    groups = split_groups(conf, float(split_ratio))
    log.info("sftmix split: %d confident / %d unconfident (split_ratio %s, checkpoints %s)", sum(groups),
             len(groups) - sum(groups), split_ratio, ", ".join(entry.get("checkpoints", [])))
    for column in ("confidence", "group"):
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
    return dataset.add_column("confidence", [float(c) for c in conf]).add_column("group", groups)


# ---- pairing order -----------------------------------------------------------------------------------------
_GROUP_CACHE: dict = {}


def _group_indices(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    key = (id(dataset), len(dataset))
    if _GROUP_CACHE.get("key") != key:
        if "group" not in dataset.column_names:
            raise KeyError("data.ordering=sftmix_pairs needs a `group` column: add the sftmix_split data stage")
        groups = torch.tensor(dataset["group"], dtype=torch.long)
        # keep a reference so the id stays unique while cached
        _GROUP_CACHE.update(key=key, dataset=dataset, confident=torch.nonzero(groups == CONFIDENT).flatten(),
                            unconfident=torch.nonzero(groups == UNCONFIDENT).flatten())
    return _GROUP_CACHE["confident"], _GROUP_CACHE["unconfident"]


def _draw(indices: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` indices: a shuffle truncated, or repeated (each pass reshuffled) when there are too few."""
    passes = [indices[torch.randperm(len(indices), generator=generator)] for _ in range(-(-count // len(indices)))]
    return torch.cat(passes)[:count]


def sftmix_pairs(dataset, seed: int, epoch: int) -> list[int]:
    """[c0, u0, c1, u1, ...] for one epoch: len(dataset) // 2 (confident, unconfident) pairs."""
    confident, unconfident = _group_indices(dataset)
    if len(confident) == 0 or len(unconfident) == 0:
        raise ValueError(f"sftmix_pairs needs both groups; got {len(confident)} confident, "
                         f"{len(unconfident)} unconfident examples")
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    n_pairs = len(dataset) // 2
    pairs = torch.stack([_draw(confident, n_pairs, generator), _draw(unconfident, n_pairs, generator)], dim=1)
    return pairs.flatten().tolist()


ORDERINGS["sftmix_pairs"] = sftmix_pairs
