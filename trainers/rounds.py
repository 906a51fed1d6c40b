"""Iterative rounds: K times generate -> score -> pair -> train, each round starting from the previous one's export.

One job: run ``rounds.count`` rounds of on-policy preference training (iterative DPO/SimPO with ``rounds.pairs=
best_worst``, SPIN with ``gold_vs_generated``) in one run directory, resumable at any point::

    <run>/config.yaml            the resolved config
    <run>/rounds.json            the state: per round, each finished stage and the fingerprint of what it wrote
    <run>/initial_model/         the run's initial model as a Hugging Face directory (rounds.reference=initial only,
                                 when the model has no such directory of its own: tiny, gguf)
    <run>/score_cache/           reward-model scores by conversation (trainers/reward_scoring.py)
    <run>/round_<k>/generations.jsonl   samples of the round's starting policy (trainers/generation.py)
    <run>/round_<k>/scored.jsonl        the same rows with the reward model's ``scores`` (best_worst)
    <run>/round_<k>/pairs.jsonl         the pairs the round trains on (pairwise_messages rows)
    <run>/round_<k>/train/              the round's Trainer run: checkpoints, metrics.jsonl, export/

Round 0 starts from the configured model; round k + 1 from round k's ``export/`` (``model.source=hf``). A LoRA run
therefore trains a fresh adapter each round over the previous round's merged export: each round's reference
(``round_start``) is then exactly its base, the policy with its adapter switched off, and the model a round starts
from is a plain directory any tool (vLLM included) loads. Stacking adapters instead would keep only adapters on disk
but make every round's generation and reference depend on all earlier adapters.

Reference per round (``rounds.reference``): ``round_start`` (default; the Trainer's reference is its initial
weights, which are the round's starting policy), ``initial`` (``reference.model_path`` = the run's initial model from
round 1 on) or ``none`` (refused for a loss that needs a reference).

Resume (``resume=auto`` with the same ``output_dir``): finished rounds are skipped; in the current round, generation
continues where it stopped (finished prompts are not regenerated), the scored rows and pairs are reused when their
recorded fingerprints match the files (and the inputs they were made from), and the Trainer resumes its own last
checkpoint. Generation and scoring run on every rank (sharded); the main process builds the pairs.

Prompt selection (``rounds.selection``, data/prompt_selection.py): from round 1 on, only the selected prompts are
regenerated; every other prompt keeps its pair of the previous round.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time

import torch
from accelerate import PartialState
from omegaconf import OmegaConf

from tunelab.data.formats import RowError
from tunelab.data.onpolicy import PairStats, build_pairs, gold_pairs, gold_response, prompt_turns, read_jsonl
from tunelab.data.prompt_selection import select_prompts
from tunelab.data.sources import load_rows
from tunelab.losses import build_loss
from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.files import write_json_atomic
from tunelab.trainers.generation import SamplingSettings, TransformersBackend, VllmBackend, run_generation
from tunelab.trainers.interrupt import TrainingInterrupted
from tunelab.trainers.models import build_model, build_tokenizer
from tunelab.trainers.reward_scoring import RewardScorer, load_reward_model, score_generations
from tunelab.trainers.trainer import RunDirError, Trainer, decide_on_main, new_run_dir

log = logging.getLogger("tunelab")
STATE_FILE = "rounds.json"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_jsonl(path: str, rows: list[dict]) -> None:
    """``rows`` as JSON lines through a temporary file renamed over ``path``: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_prompt_rows(spec) -> tuple[list[list[dict]], list[dict]]:
    """(prompt turns, raw rows) of the ``rounds.prompts`` source; a bad row is an error naming the file and row."""
    rows, _ = load_rows(spec, on_error="raise")
    turns, raw = [], []
    for row in rows:
        clean = {k: v for k, v in row.items() if v is not None and not k.startswith("_")}
        try:
            turns.append(prompt_turns(clean))
        except RowError as err:
            raise ValueError(f"rounds.prompts: {row['_source']} row {row['_row']}: {err}") from err
        raw.append({**clean, "_where": f"{row['_source']} row {row['_row']}"})
    return turns, raw


class RoundsRunner:
    """Runs every round of ``cfg`` (``rounds.count`` > 0); ``run()`` returns the per-round summaries."""

    def __init__(self, cfg, recipe_name: str = "run"):
        self.cfg, self.recipe_name = cfg, recipe_name
        self.rounds = cfg.rounds
        loss_needs = build_loss(cfg.loss, cfg.get("pair_weighting")).needs
        if self.rounds.reference == "none" and loss_needs.reference:
            raise ValueError(f"rounds.reference=none: the loss {', '.join(cfg.loss)} needs a reference model; use "
                             "round_start or initial, or a reference-free loss (simpo, orpo, cpo)")
        if not loss_needs.pairs:
            raise ValueError(f"rounds: the loss {', '.join(cfg.loss)} does not train on pairs")
        if self.rounds.pairs == "best_worst" and not self.rounds.reward_model:
            raise ValueError("rounds.pairs=best_worst needs rounds.reward_model=<a reward model directory>, e.g. one "
                             "trained by `python train.py recipe=reward output_dir=runs/reward` (its export/)")
        self.run_dir = decide_on_main(self.state, self._prepare_run_dir)
        self.prompts, self.rows = read_prompt_rows(self.rounds.prompts)
        self.golds = None
        if self.rounds.pairs == "gold_vs_generated":
            self.golds = []
            for row in self.rows:
                try:
                    self.golds.append(gold_response(row))
                except RowError as err:
                    raise ValueError(f"rounds.pairs=gold_vs_generated: {row['_where']}: {err}") from err
        self.progress = self.state.is_main_process and bool(cfg.train.progress_bar)

    @property
    def state(self) -> PartialState:
        """The process state, asked afresh: each round's Trainer resets Accelerate's when it ends."""
        return PartialState()

    # ---- run directory and state ---------------------------------------------------------------------------
    def _prepare_run_dir(self) -> str:
        resuming = self.cfg.resume not in (None, "", "none")
        run_dir = str(self.cfg.output_dir) if self.cfg.output_dir else new_run_dir(self.recipe_name)
        entries = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
        if entries and not resuming:
            raise RunDirError(f"output_dir={run_dir} is not empty ({', '.join(entries[:5])}): it holds another run. "
                              "Continue it with resume=auto, or choose another output_dir")
        if resuming and entries and STATE_FILE not in entries:
            raise RunDirError(f"output_dir={run_dir} holds no {STATE_FILE}: it is not an iterative run")
        os.makedirs(run_dir, exist_ok=True)
        config = os.path.join(run_dir, "config.yaml")
        if not os.path.exists(config):
            OmegaConf.save(self.cfg, config, resolve=True)
        if not os.path.exists(os.path.join(run_dir, STATE_FILE)):
            write_json_atomic(os.path.join(run_dir, STATE_FILE), {"rounds": []})
        return os.path.abspath(run_dir)

    def _load_state(self) -> dict:
        with open(os.path.join(self.run_dir, STATE_FILE)) as handle:
            return json.load(handle)

    def _record(self, k: int, stage: str, value) -> None:
        """Main process: set ``rounds[k][stage]`` in rounds.json (atomically); every rank waits for it."""
        if self.state.is_main_process:
            state = self._load_state()
            while len(state["rounds"]) <= k:
                state["rounds"].append({"round": len(state["rounds"])})
            state["rounds"][k][stage] = value
            write_json_atomic(os.path.join(self.run_dir, STATE_FILE), state)
        self.state.wait_for_everyone()

    def _entry(self, k: int) -> dict:
        rounds = self._load_state()["rounds"]
        return rounds[k] if k < len(rounds) else {}

    def round_dir(self, k: int) -> str:
        return os.path.join(self.run_dir, f"round_{k}")

    @staticmethod
    def _matches(recorded: dict | None, inputs: str, path: str) -> bool:
        """Whether a stage recorded as made from ``inputs`` still has that input and its file is unchanged."""
        return bool(recorded) and recorded["inputs"] == inputs and os.path.exists(path) and \
            file_sha256(path) == recorded["sha256"]

    # ---- models of a round ---------------------------------------------------------------------------------
    def model_config(self, k: int):
        """The model round ``k`` starts from: the configured one, then the previous round's export."""
        if k == 0:
            return self.cfg.model
        model = OmegaConf.create(OmegaConf.to_container(self.cfg.model, resolve=True))
        model.source, model.name_or_path = "hf", os.path.join(self.round_dir(k - 1), "train", "export")
        model.tokenizer = None  # the export holds the tokenizer the run trained with
        return model

    def initial_model_path(self) -> str:
        """A Hugging Face directory of the run's initial model, written once (main process) if it has none."""
        model = self.cfg.model
        if model.source == "hf":
            return str(model.name_or_path)
        path = os.path.join(self.run_dir, "initial_model")
        if self.state.is_main_process and not os.path.exists(os.path.join(path, "config.json")):
            plain = OmegaConf.create(OmegaConf.to_container(model, resolve=True))
            plain.lora.enabled, plain.gradient_checkpointing = False, False
            tokenizer = build_tokenizer(plain)
            built = build_model(plain, tokenizer, self.cfg.seed)
            tmp = f"{path}.tmp{os.getpid()}"
            built.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, path)
        self.state.wait_for_everyone()
        return path

    def _sampling_model(self, k: int):
        """(model, tokenizer) that samples round ``k``: its starting weights, plain (no adapter: a fresh LoRA adapter
        adds nothing), with SDPA attention, in eval mode on this rank's device."""
        model_cfg = OmegaConf.create(OmegaConf.to_container(self.model_config(k), resolve=True))
        model_cfg.lora.enabled, model_cfg.gradient_checkpointing = False, False
        model_cfg.attn_implementation = "sdpa"
        tokenizer = build_tokenizer(model_cfg)
        model = build_model(model_cfg, tokenizer, self.cfg.seed)
        model.config.use_cache = True
        if tokenizer.pad_token is None:  # padded positions are masked, so any id works
            tokenizer.pad_token = tokenizer.eos_token
        return model.to(self.state.device).eval(), tokenizer

    def _backend(self, k: int):
        if self.rounds.backend == "vllm":
            model_cfg = self.model_config(k)
            if model_cfg.source == "tiny":
                raise ValueError("rounds.backend=vllm needs a model vLLM can load (hf or gguf), not source=tiny")
            spec = str(model_cfg.name_or_path if model_cfg.source == "hf" else model_cfg.gguf_file)
            return VllmBackend(spec, dtype=self.cfg.model.dtype)
        model, tokenizer = self._sampling_model(k)
        return TransformersBackend(model, tokenizer, batch_size=self.rounds.generation_batch_size)

    # ---- stages --------------------------------------------------------------------------------------------
    def selected_prompts(self, k: int) -> list[int]:
        """The prompt indices round ``k`` regenerates: all in round 0 (or without a selection), else the selection
        applied to the previous round's chosen rewards (None for a prompt that gave no pair)."""
        everything = list(range(len(self.prompts)))
        if k == 0 or not self.rounds.selection:
            return everything
        previous: dict[int, float | None] = dict.fromkeys(everything)
        rows, _ = read_jsonl(os.path.join(self.round_dir(k - 1), "pairs.jsonl"))
        for pair in rows:
            previous[pair["prompt_index"]] = pair["chosen_reward"]
        return select_prompts(OmegaConf.to_container(self.rounds.selection, resolve=True), previous)

    def generate(self, k: int, selected: list[int]) -> str:
        out = os.path.join(self.round_dir(k), "generations.jsonl")
        model = self.cfg.model  # the run's own model, or the previous round's export (named relative to the run)
        start = f"round_{k - 1}/train/export" if k else f"{model.source}:{model.get('name_or_path') or ''}" \
                                                         f"{model.get('gguf_file') or ''}"
        inputs = json.dumps({"selected": selected, "model": start})
        if self._matches(self._entry(k).get("generations"), inputs, out):
            return out
        rounds = self.rounds
        samples = rounds.samples if rounds.pairs == "best_worst" else 1
        settings = SamplingSettings(samples, rounds.temperature, rounds.top_p, rounds.max_new_tokens,
                                    seed=self.cfg.seed + k)  # a new draw each round
        started = time.perf_counter()
        backend = self._backend(k)
        run_generation(backend, [self.prompts[i] for i in selected], out, settings,
                       {"round": k, "inputs": inputs}, state=self.state, progress=self.progress)
        del backend
        gc.collect()
        self._record(k, "generations", {"inputs": inputs, "sha256": file_sha256(out) if self.state.is_main_process
                                        else None, "seconds": time.perf_counter() - started})
        return out

    def score(self, k: int, generations: str) -> str:
        out = os.path.join(self.round_dir(k), "scored.jsonl")
        inputs = json.dumps({"generations": file_sha256(generations), "reward_model": self.rounds.reward_model})
        if self._matches(self._entry(k).get("scored"), inputs, out):
            return out
        started = time.perf_counter()
        model, tokenizer = load_reward_model(str(self.rounds.reward_model))
        scorer = RewardScorer(model.to(self.state.device), tokenizer, str(self.rounds.reward_model),
                              batch_size=self.rounds.reward_batch_size,
                              cache_dir=os.path.join(self.run_dir, "score_cache"))
        scored = score_generations(read_jsonl(generations)[0], scorer, self.state)
        del model, scorer
        gc.collect()
        if self.state.is_main_process:
            write_jsonl(out, scored)
        self._record(k, "scored", {"inputs": inputs, "sha256": file_sha256(out) if self.state.is_main_process
                                   else None, "seconds": time.perf_counter() - started})
        return out

    def pair(self, k: int, source: str, selected: list[int]) -> str:
        """Main process: the round's pairs from ``source`` (scored or generated rows of the ``selected`` prompts),
        plus the previous round's pairs of the prompts not regenerated."""
        out = os.path.join(self.round_dir(k), "pairs.jsonl")
        previous = os.path.join(self.round_dir(k - 1), "pairs.jsonl") if k else None
        kept = len(selected) < len(self.prompts)
        inputs = json.dumps({"source": file_sha256(source), "pairs": self.rounds.pairs,
                             "min_margin": self.rounds.min_margin,
                             "previous": file_sha256(previous) if kept else None})
        if self._matches(self._entry(k).get("pairs"), inputs, out):
            return out
        if self.state.is_main_process:
            stats, by_prompt = PairStats(), {}
            for row in read_jsonl(source)[0]:  # row "index": the position in ``selected``
                i = selected[row["index"]]
                if self.rounds.pairs == "best_worst":
                    pairs, one = build_pairs([row], self.rounds.min_margin)
                else:
                    pairs, one = gold_pairs([row], [self.golds[i]])
                stats.prompts, stats.pairs = stats.prompts + one.prompts, stats.pairs + one.pairs
                stats.dropped.update(one.dropped)
                for pair in pairs:  # OPTune's pair weighting reads the rewards under these names
                    by_prompt[i] = {**pair, "prompt_index": i, "round": k, "chosen_reward": pair["score_chosen"],
                                    "rejected_reward": pair["score_rejected"]}
            if kept:
                chosen = set(selected)
                for pair in read_jsonl(previous)[0]:
                    if pair["prompt_index"] not in chosen:
                        by_prompt[pair["prompt_index"]] = pair
            write_jsonl(out, [by_prompt[i] for i in sorted(by_prompt)])
            log.info("round %d: %s%s", k, stats.summary(),
                     f"; {len(by_prompt) - stats.pairs} pairs kept from round {k - 1}" if kept else "")
        self._record(k, "pairs", {"inputs": inputs, "sha256": file_sha256(out) if self.state.is_main_process
                                  else None})
        if not read_jsonl(out)[0]:
            raise RuntimeError(f"round {k}: no pairs in {out} (every prompt was dropped); see the counts above")
        return out

    def train_config(self, k: int, pairs: str):
        """The config of round ``k``'s Trainer run: the recipe with the pairs as its data, the round's model, its
        reference and its learning rate."""
        cfg = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=True))
        cfg.output_dir, cfg.resume = os.path.join(self.round_dir(k), "train"), "auto"
        cfg.rounds.count = 0
        cfg.data.path = None
        cfg.data.sources = [{"path": pairs, "format": "pairwise_messages"}]
        cfg.model = self.model_config(k)
        if self.rounds.reference == "initial" and k > 0:
            cfg.reference.model_path = self.initial_model_path()
        if self.rounds.lr is not None:
            cfg.train.lr = float(self.rounds.lr[k])
        return cfg

    def train(self, k: int, pairs: str) -> dict:
        try:
            return Trainer(self.train_config(k, pairs), recipe_name=f"{self.recipe_name}-round{k}").fit()
        except TrainingInterrupted as stopped:
            raise TrainingInterrupted(stopped.exit_code - 128, f"round {k}: {stopped}. To continue every round, run "
                                      f"the same command with output_dir={self.run_dir} resume=auto") from stopped
        finally:
            reset_accelerate()
            gc.collect()

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        summaries = []
        for k in range(self.rounds.count):
            entry = self._entry(k)
            if entry.get("trained"):
                summaries.append(entry["trained"])
                continue
            os.makedirs(self.round_dir(k), exist_ok=True)
            selected = self.selected_prompts(k)
            generations = self.generate(k, selected)
            source = self.score(k, generations) if self.rounds.pairs == "best_worst" else generations
            pairs = self.pair(k, source, selected)
            started = time.perf_counter()
            summary = self.train(k, pairs)
            done = {"export": summary["export"], "steps": summary["steps"], "train_last": summary["train_last"],
                    "eval_after": summary["eval_after"], "seconds": time.perf_counter() - started,
                    "regenerated": len(selected)}
            self._record(k, "trained", done)
            summaries.append(done)
            if self.state.is_main_process:
                log.info("round %d of %d done: %d prompts regenerated, export %s", k + 1, self.rounds.count,
                         len(selected), summary["export"])
        return summaries


def run_rounds(cfg, recipe_name: str = "run") -> list[dict]:
    """Every round of ``cfg`` (train.py calls this when ``rounds.count`` > 0)."""
    torch.set_grad_enabled(True)
    return RoundsRunner(cfg, recipe_name).run()
