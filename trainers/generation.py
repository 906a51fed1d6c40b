"""Sampling N responses per prompt from a model into a resumable JSONL file, sharded over data-parallel ranks.

Models (``load_model``): a hub id or local directory, a GGUF file (``pkg:file.gguf`` or a path), a tunelab run
directory (its ``export/``), one of its checkpoints (``checkpoints/step_N``: built from the run's ``config.yaml``,
the LoRA base included, then the checkpoint's weights) or a LoRA adapter directory (``export_adapter/``); an adapter
given separately is applied over the model. Adapters are merged for generation (same function, one matmul less).

Sampling (``TransformersBackend``): the tokenizer's chat template with the generation prompt, batches left-padded
with explicit position ids and the KV cache, temperature (0 = greedy), top-p (nucleus), at most ``max_new_tokens``,
a sample ends at an end-of-sequence token (the tokenizer's and the model's generation config's). Each sample draws
from its own ``torch.Generator`` seeded by ``sample_seed(seed, prompt index, sample index)``, so the draws of a
sample do not depend on which prompts share its batch, the batch size or the number of ranks. Guarantee: the same
model, settings and seed on the same hardware and software give identical outputs; across batch compositions the
random draws are identical and only the logits can differ in the last bits (padding changes the kernels' reduction
shapes), which flips a sampled token only when a draw falls within that rounding of a boundary. Tests check equality
across batch sizes and rank counts on CPU in float32.

Files: one JSON line per prompt (``OUTPUT_FIELDS``), written and fsync'd as soon as the prompt's samples are done.
A restart reads the file (data/onpolicy.read_jsonl), drops a torn last line, skips finished prompts and appends
the rest; ``<out>.meta.json`` pins the input, model and settings, and a resume with different ones is refused.
With W ranks (``accelerate launch``), rank r takes prompts r, r+W, ... and writes ``<out>.rank<r>-of-<W>``; after
all ranks finish, the main process merges every shard (and a previous ``<out>``) in prompt order into ``<out>``
through a temporary file, then removes the shards. Resume therefore works per shard, even with another W.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from tunelab.data.formats import RowError
from tunelab.data.onpolicy import prompt_text, prompt_turns, read_jsonl
from tunelab.trainers.files import write_json_atomic

log = logging.getLogger(__name__)
OUTPUT_FIELDS = ("index", "prompt", "messages", "responses", "finish_reasons", "num_tokens")
BACKENDS = ("transformers", "vllm")


@dataclass(frozen=True)
class SamplingSettings:
    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError(f"num_samples ({self.num_samples}) and max_new_tokens ({self.max_new_tokens}) must be "
                             ">= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 (0: greedy), top_p in (0, 1]; got {self.temperature}, "
                             f"{self.top_p}")


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one sample, a hash of (seed, prompt, sample): independent streams per sample."""
    digest = hashlib.sha256(f"{seed}/{prompt_index}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---- prompts and models -------------------------------------------------------------------------------------------

def read_prompts(path: str, max_rows: int | None = None, split: str | None = None) -> list[list[dict]]:
    """The prompt turns of each row of a local JSON/JSONL/parquet file or hub dataset (data/sources.py reads it), in
    any format ``data.onpolicy.prompt_turns`` takes; a bad row is an error naming the file and row."""
    from omegaconf import OmegaConf

    from tunelab.data.sources import load_rows

    rows, _ = load_rows(OmegaConf.create({"path": path, "max_rows": max_rows, "split": split}), on_error="raise")
    prompts = []
    for row in rows:
        try:
            prompts.append(prompt_turns({k: v for k, v in row.items() if v is not None and not k.startswith("_")}))
        except RowError as err:
            raise ValueError(f"{row['_source']} row {row['_row']}: {err}") from err
    return prompts


def unique(prompts: list[list[dict]]) -> list[list[dict]]:
    """The prompts without repeats, first occurrences in order (UltraFeedback repeats some prompts)."""
    seen, kept = set(), []
    for turns in prompts:
        key = json.dumps(turns, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(turns)
    return kept


def _gguf_location(spec: str) -> tuple[str, str]:
    from tunelab.trainers.models import package_file

    path = package_file(spec) if ":" in spec else spec
    return os.path.dirname(path), os.path.basename(path)


def _from_checkpoint(checkpoint: str, dtype: torch.dtype):
    """A run's checkpoint as a plain causal LM: the model its ``config.yaml`` builds, with the checkpoint's weights."""
    from omegaconf import OmegaConf

    from tunelab.trainers.forward import CausalLMWithLogProbs
    from tunelab.trainers.models import build_model, build_tokenizer
    from tunelab.trainers.sftmix_scores import load_checkpoint_weights

    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    config = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{checkpoint} is a checkpoint but {config} is missing: it must sit in "
                                "<run>/checkpoints/ of a tunelab run")
    cfg = OmegaConf.load(config)
    cfg.model.attn_implementation = "sdpa"  # the layout-aware tile attention is for packed training rows
    cfg.model.gradient_checkpointing = False
    tokenizer = build_tokenizer(cfg.model)
    wrapper = CausalLMWithLogProbs(build_model(cfg.model, tokenizer, cfg.seed), cfg.train.logits_chunk_size)
    load_checkpoint_weights(wrapper, checkpoint)
    return wrapper.model.to(dtype), tokenizer


def _merged(model):
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def load_model(spec: str, adapter: str | None = None, dtype: str = "float32"):
    """(model in eval mode, tokenizer) for a model ``spec`` (see the module docstring) and an optional adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.trainers.models import DTYPES

    torch_dtype = DTYPES[dtype]
    options = {"dtype": torch_dtype, "attn_implementation": "sdpa"}
    if spec.endswith(".gguf"):
        folder, name = _gguf_location(spec)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **options)
    elif os.path.isfile(os.path.join(spec, "trainer_state.json")):
        model, tokenizer = _from_checkpoint(spec, torch_dtype)
    elif os.path.isfile(os.path.join(spec, "config.yaml")) and os.path.isdir(os.path.join(spec, "export")):
        return load_model(os.path.join(spec, "export"), adapter, dtype)
    elif os.path.isfile(os.path.join(spec, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        model = _merged(AutoPeftModelForCausalLM.from_pretrained(spec, **options))
        tokenizer = AutoTokenizer.from_pretrained(spec)
    else:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, **options)
    if adapter:
        from peft import PeftModel

        model = _merged(PeftModel.from_pretrained(model, adapter))
    if tokenizer.pad_token is None:  # padded positions are masked, so any id works
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a sample: the tokenizer's end-of-sequence token and the model's generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if not ids:
        raise ValueError("the tokenizer and the model's generation config name no end-of-sequence token")
    return ids


# ---- backends ---------------------------------------------------------------------------------------------------

def chat_text(tokenizer, turns: list[dict]) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def next_tokens(logits: torch.Tensor, generators: list[torch.Generator], temperature: float,
                top_p: float) -> torch.Tensor:
    """One token per row of float32 ``logits`` [B, V]: greedy at temperature 0, else a draw from the row's generator
    over the smallest set of most likely tokens whose probability reaches ``top_p`` (at least the top one)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    order = None
    if top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
        probs = probs.masked_fill(outside, 0.0)
    # inverse-CDF draw: one uniform number per row from the row's own generator (a per-row multinomial costs more)
    cdf = probs.cumsum(-1)
    uniform = torch.stack([torch.rand((), generator=g, dtype=cdf.dtype) for g in generators])
    picks = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=cdf.shape[-1] - 1)
    return (picks if order is None else order.gather(-1, picks)).squeeze(-1)


class TransformersBackend:
    """Batched sampling with transformers models on their device (see the module docstring for the guarantee)."""

    name = "transformers"

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos = eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def _batch(self, texts: list[str], seeds: list[int], settings: SamplingSettings) -> list[tuple[list[int], str]]:
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        tokens: list[list[int]] = [[] for _ in texts]
        reasons = ["length"] * len(texts)
        done = torch.zeros(len(texts), dtype=torch.bool)
        cache = None
        for _ in range(settings.max_new_tokens):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True, logits_to_keep=1)
            cache = out.cache
            picked = next_tokens(out.logits[:, -1].float().cpu(), generators, settings.temperature, settings.top_p)
            for row, token in enumerate(picked.tolist()):
                if done[row]:
                    continue
                if token in self.eos:
                    done[row], reasons[row] = True, "eos"
                else:
                    tokens[row].append(token)
            if bool(done.all()):
                break
            ids = picked.masked_fill(done, self.tokenizer.pad_token_id).view(-1, 1).to(self.device)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
        return list(zip(tokens, reasons))

    def generate(self, items: list[tuple[int, list[dict]]], settings: SamplingSettings) -> list[dict]:
        """For each (prompt index, prompt turns): its ``responses``, ``finish_reasons`` and ``num_tokens``."""
        flat = [(i, j, chat_text(self.tokenizer, turns)) for i, turns in items for j in range(settings.num_samples)]
        results = []
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start:start + self.batch_size]
            results += self._batch([text for _, _, text in chunk],
                                   [sample_seed(settings.seed, i, j) for i, j, _ in chunk], settings)
        rows = []
        for k in range(len(items)):
            mine = results[k * settings.num_samples:(k + 1) * settings.num_samples]
            rows.append({"responses": [self.tokenizer.decode(t, skip_special_tokens=True) for t, _ in mine],
                         "finish_reasons": [reason for _, reason in mine],
                         "num_tokens": [len(t) for t, _ in mine]})
        return rows


class VllmBackend:
    """vLLM on a GPU (``pip install vllm``): same schema; each sample seeded per request with the whole 63-bit
    ``sample_seed``, as the transformers backend seeds its generators, so its draws do not depend on batching either
    (vLLM's per-request generator), though vLLM's kernels and its sampler differ from transformers', so the two
    backends give different samples for one seed. ``engine_options`` go to ``vllm.LLM`` as they are (online DPO's
    colocated engine, trainers/vllm_sync.py, passes its launcher, memory share and dummy weights)."""

    name = "vllm"

    def __init__(self, spec: str, dtype: str = "bfloat16", max_model_len: int | None = None, **engine_options):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("backend=vllm needs vLLM on a GPU machine: pip install vllm") from err
        if spec.endswith(".gguf"):
            folder, name = _gguf_location(spec)
            spec = os.path.join(folder, name)
        self.llm = LLM(model=spec, dtype=dtype, max_model_len=max_model_len, **{"seed": 0, **engine_options})
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, items: list[tuple[int, list[dict]]], settings: SamplingSettings) -> list[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests, params = [], []
        for i, turns in items:
            ids = self.tokenizer(chat_text(self.tokenizer, turns), add_special_tokens=False)["input_ids"]
            for j in range(settings.num_samples):
                requests.append(TokensPrompt(prompt_token_ids=ids))
                params.append(SamplingParams(n=1, temperature=settings.temperature, top_p=settings.top_p,
                                             max_tokens=settings.max_new_tokens,
                                             seed=sample_seed(settings.seed, i, j)))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows = []
        for k in range(len(items)):
            mine = [o.outputs[0] for o in outputs[k * settings.num_samples:(k + 1) * settings.num_samples]]
            rows.append({"responses": [o.text for o in mine],
                         "finish_reasons": ["eos" if o.finish_reason == "stop" else "length" for o in mine],
                         "num_tokens": [len(o.token_ids) for o in mine]})
        return rows


# ---- files, resume and shards -------------------------------------------------------------------------------------

def shard_path(out: str, rank: int, world: int) -> str:
    return out if world == 1 else f"{out}.rank{rank}-of-{world}"


def _shards(out: str) -> list[str]:
    return sorted(glob.glob(glob.escape(out) + ".rank*-of-*"))


def finished_rows(out: str) -> dict[int, dict]:
    """The rows already written for ``out`` (the merged file and every shard), by prompt index."""
    rows = {}
    for path in [out, *_shards(out)]:
        if os.path.exists(path):
            for row in read_jsonl(path)[0]:
                rows[row["index"]] = row
    return rows


def _drop_torn_tail(path: str) -> None:
    """Cut a torn last line (a write killed mid-line) so that appended lines start on a line of their own."""
    if not os.path.exists(path):
        return
    rows, torn = read_jsonl(path)
    if torn:
        with open(path, "rb+") as handle:
            data = handle.read()
            handle.truncate(data.rfind(b"\n") + 1)
        log.warning("%s: dropped a torn last line (a run was stopped while writing it)", path)


def check_meta(out: str, meta: dict) -> None:
    """Write ``<out>.meta.json`` (main process), or refuse to resume a file made with other inputs or settings."""
    path = f"{out}.meta.json"
    if os.path.exists(path):
        with open(path) as handle:
            saved = json.load(handle)
        changed = sorted(key for key in set(saved) | set(meta) if saved.get(key) != meta.get(key))
        if changed:
            raise ValueError(f"{out} was generated with other {', '.join(changed)} ({path}); resume with the same "
                             "settings or write to a new file")
    else:
        write_json_atomic(path, meta)


def generate_shard(backend, prompts: list[list[dict]], out: str, settings: SamplingSettings, rank: int = 0,
                   world: int = 1, prompts_per_step: int = 8, progress: bool = True) -> int:
    """Generate this rank's unfinished prompts (``rank::world``) into its shard, prompts_per_step at a time, each
    line flushed and fsync'd; returns how many prompts it generated."""
    path = shard_path(out, rank, world)
    _drop_torn_tail(path)
    done = finished_rows(out)
    todo = [i for i in range(rank, len(prompts), world) if i not in done]
    bar = tqdm(total=len(prompts), initial=len(done), unit="prompt",
               desc="generating", dynamic_ncols=True, disable=not (progress and rank == 0))
    start, new_tokens = time.perf_counter(), 0
    with open(path, "a", encoding="utf-8") as handle:
        for first in range(0, len(todo), prompts_per_step):
            step = todo[first:first + prompts_per_step]
            results = backend.generate([(i, prompts[i]) for i in step], settings)
            for i, result in zip(step, results):
                row = {"index": i, "prompt": prompt_text(prompts[i]), "messages": prompts[i], **result}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                new_tokens += sum(result["num_tokens"])
            handle.flush()
            os.fsync(handle.fileno())
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.update(len(step) * world)  # this rank's progress stands for every rank's
            bar.set_postfix(prompts_s=f"{(first + len(step)) * world / elapsed:.2f}",
                            tokens_s=f"{new_tokens * world / elapsed:.1f}")
    bar.close()
    return len(todo)


def merge_shards(out: str, num_prompts: int) -> None:
    """Every finished row (shards and a previous ``out``) into ``out`` in prompt order (main process, after every
    rank has finished); refuses if a prompt is missing, then removes the shards."""
    rows = finished_rows(out)
    missing = [i for i in range(num_prompts) if i not in rows]
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} of {num_prompts} prompts have no row (e.g. {missing[:5]}); rerun "
                           "the same command to finish them")
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        for i in range(num_prompts):
            handle.write(json.dumps(rows[i], ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out)
    for shard in _shards(out):
        os.remove(shard)


def run_generation(backend, prompts: list[list[dict]], out: str, settings: SamplingSettings, meta: dict,
                   state=None, prompts_per_step: int = 8, progress: bool = True) -> str:
    """The whole generation on every rank of ``state`` (accelerate's PartialState; None: one process)."""
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    meta = {**meta, "settings": asdict(settings), "num_prompts": len(prompts),
            "prompts_sha256": hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()}
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        check_meta(out, meta)
    if state is not None:
        state.wait_for_everyone()
    made = generate_shard(backend, prompts, out, settings, rank, world, prompts_per_step, progress)
    log.info("rank %d: generated %d prompts into %s", rank, made, shard_path(out, rank, world))
    if state is not None:
        state.wait_for_everyone()
    if rank == 0 and (world > 1 or _shards(out)):  # one process may finish what several began
        merge_shards(out, len(prompts))
    if state is not None:
        state.wait_for_everyone()
    return out
