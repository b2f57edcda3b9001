# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.7.1", "tokenizers>=0.21.2", "requests>=2.28"]
# ///
"""Qwen3 from scratch, in one file of plain PyTorch.

A companion to chapter 2 of *Build a Reasoning Model (From Scratch)*: the same names as the book's
`reasoning_from_scratch` package (`Qwen3Model`, `QWEN_CONFIG_06_B`, `Qwen3Tokenizer`, `KVCache`,
`download_qwen3_small`, `generate_text_basic_cache`, `generate_stats`, ...), so every snippet of the
chapter runs with `from qwen3_minimal import ...`, and the book's weight files load with
`load_state_dict`.

Read it top to bottom, in the chapter's order:
  1. device                 get_device()                                        (section 2.5)
  2. tokenizer              Qwen3Tokenizer, chat template, streaming decode      (section 2.4)
  3. model parts            RMSNorm, RoPE, KVCache, attention, feedforward, block (figure 2.8, appendix C)
  4. the model              Qwen3Model, current_pos, padding masks, its configs  (section 2.5)
  5. weights                download_qwen3_small, names, safetensors, load_qwen3 (section 2.5),
                            and the later chapters' loaders and checkpoints
  6. generation             the chapter's loops, with and without a KV cache,
                            and generate_stats                                   (sections 2.6-2.9)
  7. speed and memory       beyond the chapter: FastGenerator (prefill, decode_one_token,
                            torch.compile, many prompts at once), float32 products, kernel
                            choices, the speed report, int8 weights
  8. the command line       `python qwen3_minimal.py --help`
  9. appendix               downloading robustly (retries, resuming, checksums)

On a first read, do as the chapter advises: treat the architecture (sections 3 and 4) as a black box
and skim the loading details (section 5 and the appendix); sections 2 and 6 are what the chapter
builds on.

References: the Qwen3 technical report (arXiv:2505.09388); Hugging Face transformers'
`models/qwen3/modeling_qwen3.py` (the reference we match logit for logit); gpt-fast (static KV cache,
meta-device loading); nanoGPT (the shape of a readable model file). The README's "Performance" section
has the measured figures behind every speed choice made here.
"""
import argparse
import contextlib
import hashlib
import json
import math
import mmap
import os
import re
import sys
import time
import types
import warnings
from pathlib import Path

with warnings.catch_warnings():
    # Without NumPy installed (it is not needed here), importing torch warns "Failed to initialize
    # NumPy" with a line of torch internals: harmless, but it reads like an error to a newcomer.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================================
# 1. Device
# A model runs wherever its tensors live. get_device() picks the first accelerator PyTorch sees
# (CUDA, Apple's MPS, Intel's XPU), as the book's package does (section 2.5), and falls back to the
# CPU, which is enough for chapters 2-4 (the README's "Performance" section has the figures).
# =============================================================================================


def get_device(enable_tensor_cores=True):
    """Return the best available torch.device (CUDA, Apple MPS, Intel XPU, else CPU) and say which."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        print("Using NVIDIA CUDA GPU")
        if enable_tensor_cores:
            # TF32, the tensor cores' float32 with a 10-bit mantissa: far faster, a little less exact
            torch.set_float32_matmul_precision("high")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
        print("Using Apple Silicon GPU (MPS)")
    elif hasattr(torch, "xpu") and torch.xpu.is_available():
        device = torch.device("xpu")
        print("Using Intel GPU")
    else:
        device = torch.device("cpu")
        print("Using CPU")
    return device


# =============================================================================================
# 2. Tokenizer
# An LLM reads and writes integers, not text (figure 2.5). Qwen3 uses byte-level BPE with a
# vocabulary of 151,643 regular tokens plus 26 added ones (<|endoftext|>, <|im_start|>, <think>,
# ...). We do not re-implement BPE (chapter 2 doesn't either): the `tokenizers` library loads
# tokenizer.json and does the splitting. Our wrapper adds what a Qwen3 user needs on top: the
# end-of-sequence ids, the chat template, and a decoder that is safe to stream token by token.
# =============================================================================================


class Qwen3Tokenizer:
    """Qwen3's tokenizer with the book's interface: `encode(text) -> ids`, `decode(ids) -> text`.

    tokenizer_file_path: the book's tokenizer-base.json or tokenizer-reasoning.json, or an
    official checkpoint's tokenizer.json. apply_chat_template: wrap every encoded prompt as a user
    turn of the chat template, ending with the assistant header if add_generation_prompt, and
    with the think block left to the model if add_thinking (else, with that header, closed empty).
    """

    def __init__(self, tokenizer_file_path="tokenizer-base.json", apply_chat_template=False,
                 add_generation_prompt=False, add_thinking=False):
        from tokenizers import Tokenizer

        path = Path(tokenizer_file_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {path} not found: download it first, with download_qwen3_small(kind="
                f"'{'reasoning' if 'reasoning' in path.name else 'base'}', tokenizer_only=True, out_dir="
                f"'{path.parent}') for the book's files or download_qwen3(repo_id) for an official checkpoint")
        self._tok = Tokenizer.from_file(str(path))
        self._added_tokens = {token.content for token in self._tok.get_added_tokens_decoder().values()}
        self.chat_wrapped = apply_chat_template  # (the book's name: here the method below has it)
        self.add_generation_prompt = add_generation_prompt
        self.add_thinking = add_thinking
        self.pad_token_id = self._tok.token_to_id("<|endoftext|>")

        # Which token ends a reply is not written in tokenizer.json. An official checkpoint
        # folder says it in generation_config.json; for the book's files the name tells:
        # base models end with <|endoftext|>, chat ("reasoning") models with <|im_end|>,
        # though they may emit either.
        self.eos_token_ids = self._eos_ids_from_config(path.parent)
        if self.eos_token_ids is None:
            is_base = "base" in path.name.lower() and "reasoning" not in path.name.lower()
            names = ["<|endoftext|>"] if is_base else ["<|im_end|>", "<|endoftext|>"]
            self.eos_token_ids = [self._tok.token_to_id(name) for name in names]
        self.eos_token_id = self.eos_token_ids[0]
        self.eos_token = self._tok.id_to_token(self.eos_token_id)

    @staticmethod
    def _eos_ids_from_config(folder):
        for file in (folder / "generation_config.json", folder / "config.json"):
            if (eos := json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None) is not None:
                return list(eos) if isinstance(eos, list) else [eos]
        return None

    def encode(self, prompt, chat_wrapped=None):
        """Text -> token ids. Special tokens written in the text (<|im_start|>, <think>, ...)
        become their single ids, because `tokenizers` matches added tokens before running BPE.
        A special token alone ("<|im_end|>") is never wrapped, as in the book: later chapters
        encode one this way to look up its id."""
        if chat_wrapped is None:
            chat_wrapped = self.chat_wrapped
        if prompt.strip() in self._added_tokens:
            return [self._tok.token_to_id(prompt.strip())]
        if chat_wrapped:
            prompt = self.apply_chat_template([{"role": "user", "content": prompt}],
                                              add_generation_prompt=self.add_generation_prompt,
                                              enable_thinking=self.add_thinking)
        return self._tok.encode(prompt, add_special_tokens=False).ids

    def decode(self, token_ids):
        """Token ids (a list, or a tensor: its rows are joined) -> text, special tokens included."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.reshape(-1).tolist()
        return self._tok.decode(token_ids, skip_special_tokens=False)

    def stream_decoder(self):
        """Return a function: next token id -> the text it completes ("" while incomplete). One Chinese
        character or emoji can span several byte-level tokens: a DecodeStream holds bytes back until
        they form whole characters, where decoding each token alone would print broken ones."""
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=False)
        return lambda token_id: stream.step(self._tok, int(token_id)) or ""

    def apply_chat_template(self, messages, add_generation_prompt=True, enable_thinking=True):
        """Render a conversation exactly as the official Qwen3 chat template does.

        `messages` is a list of {"role": "system" | "user" | "assistant", "content": str}.
        Assistant turns before the last user message lose their <think>...</think> part (the
        model never sees its old reasoning; an assistant message may also give it apart, as
        "reasoning_content"); `enable_thinking=False` pre-fills an empty think block so that the
        model answers directly.
        """
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"chat message {i} is {message!r}: each message needs a 'role' and a "
                                 f"'content', e.g. {{'role': 'user', 'content': 'Hello'}}")
        out = []
        if messages and messages[0]["role"] == "system":
            out.append(f"<|im_start|>system\n{messages[0]['content'] or ''}<|im_end|>\n")
        user_turns = [i for i, m in enumerate(messages) if m["role"] == "user"]
        last_query = user_turns[-1] if user_turns else len(messages) - 1
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"] or ""  # None renders as "", as officially
            if role == "user" or (role == "system" and i > 0):
                out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
            elif role == "assistant":
                reasoning = message.get("reasoning_content")
                if not isinstance(reasoning, str):
                    reasoning = ""
                    if "</think>" in content:
                        reasoning = content.split("</think>")[0].rstrip("\n")
                        reasoning = reasoning.split("<think>")[-1].lstrip("\n")
                        content = content.split("</think>")[-1].lstrip("\n")
                if i > last_query and (i == len(messages) - 1 or reasoning):
                    reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
                    out.append(f"<|im_start|>assistant\n<think>\n{reasoning}\n</think>\n\n{content}<|im_end|>\n")
                else:
                    out.append(f"<|im_start|>assistant\n{content}<|im_end|>\n")
            elif role != "system":
                raise ValueError(f"unsupported chat role {role!r}: use 'system', 'user' or 'assistant'")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
            if not enable_thinking:
                out.append("<think>\n\n</think>\n\n")
        return "".join(out)


# =============================================================================================
# 3. Model parts, from small to large (figure 2.8, read bottom to top)
# Qwen3 is a decoder-only transformer: token embedding, n_layers identical blocks (28 in 0.6B), a final
# norm and a linear output head. Each block is "pre-norm": it normalizes its input before
# attention and before the feedforward, and adds each result back to its input. That running sum,
# which flows from the embedding through every block to the head, is the "residual stream".
# We build what a block needs first: RMSNorm, rotary position embeddings (RoPE), the KV cache
# that attention writes to, grouped-query attention and the SwiGLU feedforward.
# Shape letters mean the same everywhere: b = batch size, T = tokens fed in this call,
# S = positions attention can see (cached ones plus the T new ones).
# =============================================================================================


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / sqrt(mean(x^2) + eps) * scale. Unlike LayerNorm it does not
    subtract the mean and has no bias, which saves work and trains just as well."""

    def __init__(self, emb_dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        # float32 whatever the model's dtype, as in the book: near 1.0 bfloat16 numbers lie 1/128
        # apart, so a bfloat16 scale could never take the small steps that training makes
        self.scale = nn.Parameter(torch.ones(emb_dim, dtype=torch.float32))

    def forward(self, x):
        input_dtype = x.dtype
        x = x.to(torch.float32)  # squares of bfloat16 values lose too much precision
        # x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps), in one fused kernel
        x = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        # As in transformers: cast back first, then multiply by the scale in the input's dtype.
        # A scale loaded from a bfloat16 checkpoint casts back exactly, so in bfloat16 the result
        # is transformers' to the bit. (The book multiplies in float32 and casts after: its
        # logits differ from the reference in the last bits.)
        return self.scale.to(input_dtype) * x.to(input_dtype)


# Rotary position embeddings (RoPE) tell attention where each token sits: every query and key
# vector is rotated by an angle proportional to its position, so the dot product of a query at
# position m and a key at position n depends only on the distance m - n. The vector's head_dim
# entries form head_dim / 2 pairs, each rotated at its own frequency theta_i = base^(-2i/head_dim).
#
# Which entries form a pair is a layout choice. The original paper (and Meta's Llama code) pairs
# neighbours, "interleaved":  (x0, x1), (x2, x3), ...
# Qwen3 and transformers pair the two halves, "rotate-half": (x0, x_d/2), (x1, x_d/2+1), ...
#
#     x = [ x0  x1 | x2  x3 ]              rotated = [ -x2  -x3 | x0  x1 ]
#           cos0 cos1  cos0 cos1            out = x * cos + rotated * sin
#
# so out[0] = x0*cos0 - x2*sin0 and out[2] = x2*cos0 + x0*sin0: a 2-D rotation of (x0, x2).
# Both layouts encode positions equally well, but weights trained with one give garbage with the
# other (logits match at position 0, where every angle is 0, and drift after): use rotate-half.


def compute_rope_params(head_dim, theta_base=10_000, context_length=4096, dtype=torch.float32):
    """Precompute cos and sin for every position: two tensors of shape (context_length, head_dim)."""
    assert head_dim % 2 == 0, "head_dim must be even: RoPE rotates pairs of entries"
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    positions = torch.arange(context_length, dtype=dtype)
    angles = positions[:, None] * inv_freq[None, :]   # (context_length, head_dim / 2)
    angles = torch.cat([angles, angles], dim=1)       # (context_length, head_dim): same angle per pair
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate x of shape (b, heads, T, head_dim) to its T positions, whose rows of the tables
    cos and sin Qwen3Model.forward picks: (1, 1, T, head_dim), or (b, 1, T, head_dim) when each
    row of a batch has positions of its own."""
    head_dim = x.shape[3]
    # Like transformers, round cos and sin to x's dtype and rotate in that dtype. (The book
    # rotates in float32; in bfloat16 the two differ in the last bits.)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # broadcast over heads (and b)
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]  # (b, heads, T, head_dim / 2) each
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """The keys and values that attention has computed so far: per layer, a (keys, values) pair,
    each of shape (b, kv_heads, S, head_dim). Section 2.8 introduces it.

    Generating token t+1 needs the keys and values of tokens 1..t. Without a cache the model
    recomputes all of them for every new token; with one it computes only the new token's and
    reads the rest back. get, update, get_all and reset are the book's protocol, and Qwen3Model
    works with any cache that has them (update_kv_cache, right below).

    Beyond the book, a "static" cache as in gpt-fast: append() writes the new entries by index
    into buffers allocated at a sequence's first write, instead of copying every cached key into
    a longer tensor at each step. Give max_len, the most positions a sequence will need, to
    allocate it all at once; without it the buffers grow as needed, in steps of 256 positions
    (each growth copies what is held). get() returns views of them: later writes go after, and
    reset() gives the next sequence new buffers, so a view keeps its values, as the book's do.
    """

    def __init__(self, n_layers, max_len=None):
        self.max_len = max_len
        self.cache = [None] * n_layers    # per layer: None, or (keys, values) so far
        self.buffers = [None] * n_layers  # per layer: the (keys, values) buffers those are views of

    def get(self, layer_idx):
        return self.cache[layer_idx]

    def update(self, layer_idx, value):
        self.cache[layer_idx] = value
        self.buffers[layer_idx] = None    # the next append() copies `value` into new buffers

    def get_all(self):
        return self.cache

    def reset(self):
        self.cache = [None] * len(self.cache)
        self.buffers = [None] * len(self.buffers)

    def append(self, layer_idx, keys, values):
        """Write a layer's new keys and values, (b, kv_heads, T, head_dim), after the S0 it holds
        and return all of them, (b, kv_heads, S0 + T, head_dim): views of the buffers."""
        held, buffers = self.cache[layer_idx], self.buffers[layer_idx]
        start = 0 if held is None else held[0].shape[2]
        end = start + keys.shape[2]
        if buffers is None or buffers[0].shape[2] < end:  # a sequence's first write, or full
            capacity = -(-max(end, self.max_len or 0) // 256) * 256  # rounded up to a multiple of 256
            buffers = tuple(keys.new_empty(*keys.shape[:2], capacity, keys.shape[3]) for _ in range(2))
            if held is not None:  # what the old buffers held, or what update() stored
                buffers[0][:, :, :start], buffers[1][:, :, :start] = held
            self.buffers[layer_idx] = buffers
        buffers[0][:, :, start:end] = keys
        buffers[1][:, :, start:end] = values
        self.cache[layer_idx] = (buffers[0][:, :, :end], buffers[1][:, :, :end])
        return self.cache[layer_idx]


def update_kv_cache(cache, layer_idx, keys, values):
    """Add a layer's new keys and values (b, kv_heads, T, head_dim) to the cache and return all
    the layer's keys and values so far, (b, kv_heads, S, head_dim)."""
    if isinstance(cache, KVCache):
        return cache.append(layer_idx, keys, values)  # written in place
    held = cache.get(layer_idx)                       # the book's KVCache: grown by concatenation
    if held is not None:
        keys, values = torch.cat([held[0], keys], dim=2), torch.cat([held[1], values], dim=2)
    cache.update(layer_idx, (keys, values))
    return keys, values


class GroupedQueryAttention(nn.Module):
    """Causal self-attention in which groups of query heads share one key/value head.

    Qwen3-0.6B has 16 query heads and 8 key/value heads ("n_kv_groups" in the book's configs):
    query heads 0-1 read kv head 0, heads 2-3 read kv head 1, and so on. That halves the KV
    cache without hurting quality much. Qwen3 adds QK-norm: an RMSNorm over each head's query
    and key vectors, before RoPE, which keeps the attention scores in a stable range.
    Note that num_heads * head_dim need not equal d_in (0.6B: 16 * 128 = 2048 vs 1024).
    """

    # True: PyTorch's fused attention kernel (fast). False: the plain computation written out,
    # as the book and appendix C teach it; both give the same result.
    fused = True

    def __init__(self, d_in, num_heads, num_kv_groups, head_dim, qk_norm=True, dtype=None):
        super().__init__()
        assert num_heads % num_kv_groups == 0, "num_heads must be a multiple of num_kv_groups"
        self.num_heads, self.num_kv_groups, self.head_dim = num_heads, num_kv_groups, head_dim
        self.group_size = num_heads // num_kv_groups
        self.d_out = num_heads * head_dim
        self.W_query = nn.Linear(d_in, self.d_out, bias=False, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=False, dtype=dtype)
        # Every Qwen3 model uses QK-norm; the config flag is kept for the book's config dicts.
        self.q_norm = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x, mask, cos, sin, cache=None, layer_idx=0):
        """mask: (1 or b, 1, T, S), True where a new token may see a position;
        cos, sin: (1 or b, 1, T, head_dim): see Qwen3Model.forward."""
        b, T, _ = x.shape
        queries = self.W_query(x).view(b, T, self.num_heads, self.head_dim)     # (b, T, num_heads, head_dim)
        keys = self.W_key(x).view(b, T, self.num_kv_groups, self.head_dim)      # (b, T, num_kv_groups, head_dim)
        values = self.W_value(x).view(b, T, self.num_kv_groups, self.head_dim)

        # QK-norm per head, then heads become a batch dimension for the attention products
        queries = self.q_norm(queries).transpose(1, 2)  # (b, num_heads, T, head_dim)
        keys = self.k_norm(keys).transpose(1, 2)        # (b, num_kv_groups, T, head_dim)
        values = values.transpose(1, 2)                 # (b, num_kv_groups, T, head_dim)
        queries, keys = apply_rope(queries, cos, sin), apply_rope(keys, cos, sin)
        if cache is not None:  # attend to every position so far, not only the new ones
            keys, values = update_kv_cache(cache, layer_idx, keys, values)  # (b, num_kv_groups, S, head_dim)
        S = keys.shape[2]

        if self.fused:
            # Each kv head serves the group_size query heads of its group. Rather than copying it
            # for each, fold the group's query heads into the rows of one attention call: query
            # head g*group_size + j, token t becomes row j*T + t of group g, and the mask repeats
            # for each j. (enable_gqa=True says the same in one flag, but copies the kv heads.)
            grouped = queries.reshape(b, self.num_kv_groups, self.group_size * T, self.head_dim)
            grouped_mask = mask.tile(self.group_size, 1)             # (1 or b, 1, group_size * T, S)
            context = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=grouped_mask)
            context = context.reshape(b, self.num_heads, T, self.head_dim)  # (kernels may not return it contiguous)
        else:
            # The plain idea, as the book writes it: repeat each kv head for its query heads.
            keys = keys.repeat_interleave(self.group_size, dim=1)      # (b, num_heads, S, head_dim)
            values = values.repeat_interleave(self.group_size, dim=1)
            scores = queries @ keys.transpose(2, 3) * self.head_dim ** -0.5  # (b, num_heads, T, S)
            scores = scores.masked_fill(~mask, -torch.inf)               # no peeking at later tokens
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
            context = weights @ values                                   # (b, num_heads, T, head_dim)
        context = context.transpose(1, 2).reshape(b, T, self.d_out)  # (b, T, num_heads * head_dim)
        return self.out_proj(context)                                 # (b, T, d_in)


class FeedForward(nn.Module):
    """SwiGLU: fc3(silu(fc1(x)) * fc2(x)). fc1 ("gate") decides how much of each of the
    hidden_dim features fc2 ("up") lets through; fc3 ("down") projects back to emb_dim."""

    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False, dtype=cfg["dtype"])
        self.fc2 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False, dtype=cfg["dtype"])
        self.fc3 = nn.Linear(cfg["hidden_dim"], cfg["emb_dim"], bias=False, dtype=cfg["dtype"])

    def forward(self, x):
        return self.fc3(F.silu(self.fc1(x)) * self.fc2(x))  # (b, T, emb_dim) via (b, T, hidden_dim)


class TransformerBlock(nn.Module):
    """One of the n_layers identical blocks: pre-norm attention, then pre-norm feedforward,
    each added back to the residual stream."""

    def __init__(self, cfg):
        super().__init__()
        self.att = GroupedQueryAttention(cfg["emb_dim"], cfg["n_heads"], cfg["n_kv_groups"],
                                         cfg["head_dim"], cfg["qk_norm"], cfg["dtype"])
        self.ff = FeedForward(cfg)
        self.norm1 = RMSNorm(cfg["emb_dim"], eps=1e-6)
        self.norm2 = RMSNorm(cfg["emb_dim"], eps=1e-6)

    def forward(self, x, mask, cos, sin, cache=None, layer_idx=0):
        x = x + self.att(self.norm1(x), mask, cos, sin, cache, layer_idx)
        x = x + self.ff(self.norm2(x))
        return x


# =============================================================================================
# 4. The model and its configs
# Qwen3Model stacks the parts: token ids -> embeddings -> n_layers blocks -> final norm ->
# output head -> one score (logit) per vocabulary entry for every position (figure 2.11).
# The output head maps the residual stream back to the vocabulary, as the embedding maps the
# vocabulary into it. Official checkpoints of the small models (0.6B, 1.7B, 4B) tie the two:
# one matrix serves both. The book's configs and .pth files keep them as two matrices (equal
# at the start), and later chapters train them apart; the config's "tie_word_embeddings" says which.
# Prompts of different lengths run as one batch when each is padded on the left to the longest
# and a mask says which positions are real (left_padded makes both; the book's batched model file
# takes the same mask): the model's forward makes the positions and the causal mask of each call.
# =============================================================================================


class Qwen3Model(nn.Module):
    """Qwen3 as in figure 2.8. cfg is a config dict such as QWEN_CONFIG_06_B (below, after
    left_padded, one comment per key); the parts above read the same keys (emb_dim, n_heads, ...).

    model(token_ids) returns logits (b, T, vocab_size). With a KV cache, as in section 2.8,
    model(token_ids, cache=cache) continues the sequence at model.current_pos, the number of
    positions seen so far; model.reset_kv_cache() starts a new sequence.
    """

    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=cfg["dtype"])
        self.trf_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = RMSNorm(cfg["emb_dim"], eps=1e-6)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=cfg["dtype"])
        if cfg.get("tie_word_embeddings", False):
            self.out_head.weight = self.tok_emb.weight  # one Parameter, printed under both names

        # RoPE tables are computed, not learned, so they are not saved with the weights. Build
        # them on the CPU even when the weights are created on the "meta" device for loading
        # (section 5: a device of shapes without memory).
        with torch.device("cpu"):
            cos, sin = compute_rope_params(cfg["head_dim"], cfg["rope_base"], cfg["context_length"])
        self.register_buffer("cos", cos, persistent=False)  # (context_length, head_dim)
        self.register_buffer("sin", sin, persistent=False)
        self.cfg = cfg
        self.current_pos = 0  # positions the KV cache holds: where the next token goes

    def reset_kv_cache(self):
        """Start a new sequence: the next cached call begins at position 0 (with a fresh or
        reset KVCache)."""
        self.current_pos = 0

    def forward(self, in_idx, cache=None, last_only=False, attn_mask=None):
        """in_idx: token ids (b, T) -> logits (b, T, vocab_size), or (b, 1, vocab_size) for
        the last position only when last_only=True (all that generation needs).

        attn_mask: for prompts of different lengths in one batch, each padded on the left to
        the longest, as the book's batched model takes it: (b, S), True for real tokens and False
        for the padding, over every position so far (the cached ones and the T new ones)."""
        if in_idx.dim() != 2 or in_idx.dtype.is_floating_point or in_idx.dtype == torch.bool:
            raise ValueError(f"token ids must be integers of shape (batch, tokens), got {in_idx.dtype} of shape "
                             f"{tuple(in_idx.shape)}: use torch.tensor([ids]) for one sequence")
        b, T = in_idx.shape
        held = cache.get(0) if cache is not None else None  # (keys, values) of the positions so far
        start_pos = 0 if held is None else self.current_pos  # an empty cache begins a new sequence
        end_pos = start_pos + T
        if end_pos > self.cfg["context_length"]:
            raise ValueError(f"{end_pos} tokens exceed the model's context length of "
                             f"{self.cfg['context_length']}: shorten the input")
        if held is not None and held[0].shape[0] != b:
            raise ValueError(f"the KV cache holds a batch of {held[0].shape[0]} rows but the input has {b}: "
                             f"begin each new batch with a fresh (or reset) cache")
        if held is not None and held[0].shape[2] != start_pos:
            raise ValueError(f"the KV cache holds {held[0].shape[2]} positions but the model stands at "
                             f"position {start_pos}: begin each new sequence with a fresh (or reset) "
                             f"cache and model.reset_kv_cache()")

        # The new tokens sit at positions start_pos .. end_pos - 1 and see every position up to
        # their own: cached ones, themselves and the new ones before them (the causal mask).
        positions = torch.arange(start_pos, end_pos, device=in_idx.device)[None]       # (1, T): every row alike
        mask = torch.arange(end_pos, device=in_idx.device) <= positions[..., None]    # (1, T, S), True = visible
        if attn_mask is not None:
            real = padding_mask(attn_mask, b, end_pos, check=held is None)           # (b, S)
            # Each row numbers its own real tokens from 0, as it would alone; real tokens see
            # only real ones, padding only padding (so that no row of a softmax is empty)
            positions = (real.cumsum(dim=1) - 1).clamp(min=0)[:, start_pos:]         # (b, T)
            mask = mask & (real[:, None, :] == real[:, start_pos:, None])             # (b, T, S)
        mask = mask[:, None]                                                          # (1 or b, 1, T, S): all heads
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]         # (1 or b, 1, T, head_dim)

        x = self.tok_emb(in_idx)                                 # (b, T, emb_dim)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, mask, cos, sin, cache, i)
        if cache is not None:
            self.current_pos = end_pos
        if last_only:
            x = x[:, -1:]                                        # (b, 1, emb_dim)
        return self.out_head(self.final_norm(x))                 # (b, T or 1, vocab_size)


def padding_mask(attn_mask, batch_size, positions, check=True):
    """A left-padding mask (b, S) as booleans, True for real tokens. Its shape is checked at every
    call; its values (check=True) where a sequence begins, as later calls only add columns."""
    if tuple(attn_mask.shape) != (batch_size, positions):
        raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}, but the input needs ({batch_size}, "
                         f"{positions}): one row per sequence, one column per position so far (cached and new)")
    real = attn_mask.to(torch.bool)
    if check and not real.any(dim=1).all():
        raise ValueError(f"row {int((~real.any(dim=1)).nonzero()[0])} of attn_mask has no real token: "
                         f"give every row at least one token")
    if check and (real[:, 1:] < real[:, :-1]).any():
        raise ValueError("attn_mask has padding after a real token: pad each row on the left (padding "
                         "first, then the tokens), as a batch for generation needs")
    return real


def left_padded(prompts, device):
    """Prompts of any lengths (lists of ids) -> one batch (b, T), each padded on the left with 0s
    to the longest, and its mask (b, T), True for real tokens (None where nothing is padded)."""
    if isinstance(prompts, torch.Tensor):
        return prompts, None
    if not prompts or not all(isinstance(ids, (list, tuple)) and ids for ids in prompts):
        raise ValueError("prompts must be a tensor (batch, tokens) or a list of non-empty lists of token ids, "
                         "e.g. [tokenizer.encode(text) for text in texts]")
    longest = max(len(ids) for ids in prompts)
    token_ids = torch.tensor([[0] * (longest - len(ids)) + list(ids) for ids in prompts], device=device)
    attn_mask = torch.tensor([[False] * (longest - len(ids)) + [True] * len(ids) for ids in prompts], device=device)
    return token_ids, None if attn_mask.all() else attn_mask


# The book's config dicts, one comment per key. "n_kv_groups" is the number of key/value heads.
# Like the book's, they keep the output head apart from the embedding (no "tie_word_embeddings"),
# so that a model built from them trains as the book's does.
QWEN_CONFIG_06_B = {
    "vocab_size": 151_936,        # Vocabulary size (151,669 used tokens, padded)
    "context_length": 40_960,     # Longest sequence the model was trained for
    "emb_dim": 1024,              # Embedding dimension (width of the residual stream)
    "n_heads": 16,                # Number of query heads
    "n_layers": 28,               # Number of transformer blocks
    "hidden_dim": 3072,           # Width of the feedforward's hidden layer
    "head_dim": 128,              # Size of each attention head
    "qk_norm": True,              # Normalize queries and keys per head (QK-norm)
    "n_kv_groups": 8,             # Number of key/value heads in grouped-query attention
    "rope_base": 1_000_000.0,     # RoPE's base "theta"
    "dtype": torch.bfloat16,      # Weights' dtype: half the memory of float32
}
QWEN3_CONFIG_1_7B = {**QWEN_CONFIG_06_B, "emb_dim": 2048, "hidden_dim": 6144}
QWEN3_CONFIG_4B = {**QWEN_CONFIG_06_B, "emb_dim": 2560, "n_heads": 32, "n_layers": 36, "hidden_dim": 9728}
QWEN3_CONFIG_8B = {**QWEN_CONFIG_06_B, "emb_dim": 4096, "n_heads": 32, "n_layers": 36, "hidden_dim": 12288}
QWEN3_CONFIG_14B = {**QWEN_CONFIG_06_B, "emb_dim": 5120, "n_heads": 40, "n_layers": 40, "hidden_dim": 17408}
QWEN3_CONFIG_32B = {**QWEN_CONFIG_06_B, "emb_dim": 5120, "n_heads": 64, "n_layers": 64, "hidden_dim": 25600}


def qwen3_config_from_hf(config):
    """An official config.json (as a dict) -> a config dict in the book's names.

    Accepts both layouts transformers has written: 4.x (`rope_theta`, `torch_dtype`) and
    5.x (`rope_parameters: {"rope_theta": ...}`, `dtype`)."""
    if config.get("model_type") != "qwen3":
        raise ValueError(f"not a dense Qwen3 config (model_type={config.get('model_type')!r}): this file "
                         f"implements Qwen3 dense models; MoE and other architectures need their own code")
    rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": config.get("rope_theta")}
    rope_scaling = config.get("rope_scaling")
    if rope.get("rope_type", "default") != "default" or (rope_scaling and rope_scaling.get("rope_type") != "default"):
        raise ValueError(f"RoPE scaling {rope_scaling or rope} is not supported: remove it from config.json")
    dtype_name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    if not isinstance(getattr(torch, str(dtype_name), None), torch.dtype):
        raise ValueError(f"config.json names the dtype {dtype_name!r}, which is not a torch dtype: "
                         f"use bfloat16, float16 or float32")
    try:
        return {
            "vocab_size": config["vocab_size"],
            "context_length": config["max_position_embeddings"],
            "emb_dim": config["hidden_size"],
            "n_heads": config["num_attention_heads"],
            "n_layers": config["num_hidden_layers"],
            "hidden_dim": config["intermediate_size"],
            "head_dim": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            "qk_norm": True,
            "n_kv_groups": config.get("num_key_value_heads") or config["num_attention_heads"],
            "rope_base": float(rope["rope_theta"] if rope.get("rope_theta") is not None else 10_000.0),
            "dtype": getattr(torch, dtype_name),
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        }
    except KeyError as missing:
        raise ValueError(f"config.json lacks {missing}: is it a Qwen3 config?") from None


# =============================================================================================
# 5. Weights: download, names, safetensors, loading
# Pre-trained weights are what make the model useful (section 2.5). They come in two layouts:
# the book's .pth files (a PyTorch state dict in this file's names) and the official Qwen
# checkpoints (safetensors files in transformers' names): one name map and one loader serve both.
# Every file comes through download_file (section 9), or is found in the Hugging Face cache.
# =============================================================================================

BOOK_REPO = "rasbt/qwen3-from-scratch"
BOOK_MIRROR = "https://f001.backblazeb2.com/file/reasoning-from-scratch"  # the book's backup
BOOK_FILES = {"base": ("qwen3-0.6B-base.pth", "tokenizer-base.json"),
              "reasoning": ("qwen3-0.6B-reasoning.pth", "tokenizer-reasoning.json")}


def download_qwen3_small(kind="base", tokenizer_only=False, out_dir="."):
    """Download the book's 0.6B weights (a .pth state dict, about 1.5 GB) and tokenizer.
    kind: "base" (the pre-trained model) or "reasoning" (Qwen's own chat/thinking model).
    Where the Hugging Face hub cannot be reached, the book's mirror is tried."""
    if kind not in BOOK_FILES:
        raise ValueError(f"kind must be 'base' or 'reasoning', not {kind!r}")
    for name in BOOK_FILES[kind][1:] if tokenizer_only else BOOK_FILES[kind]:  # (weights, tokenizer)
        download_file(hub_url(BOOK_REPO, name), out_dir, backup_url=f"{BOOK_MIRROR}/qwen3-0.6B/{name}")


# Chapters 7 (GRPO) and 8 (distillation) load the book's .pth checkpoints of their training runs.
GRPO_FOLDERS = {"no_kl": "grpo_original_no_kl", "tracking": "7_3_plus_tracking/checkpoints",
                "clip_ratio": "7_4_plus_clip_ratio/checkpoints", "kl": "7_5_plus_kl/checkpoints",
                "format_reward": "7_6_plus_format_reward/checkpoints"}
DISTILL_STEPS = {"deepseek_r1": ("06682", "13364", "20046"), "qwen3_235b_a22b": ("05746", "11492", "17238")}


def download_qwen3_grpo_checkpoints(grpo_type="no_kl", step="00050", out_dir="."):
    """Download the checkpoint of GRPO run `grpo_type` after `step` (50 or "00050") and return its path."""
    if grpo_type not in GRPO_FOLDERS:
        raise ValueError(f"grpo_type must be one of {list(GRPO_FOLDERS)}, not {grpo_type!r}")
    step = str(step).zfill(5) if str(step).isdigit() else str(step)
    path = f"{GRPO_FOLDERS[grpo_type]}/qwen3-0.6B-rlvr-grpo-step{step}.pth"
    backup = f"{BOOK_MIRROR}/qwen3-0.6B-checkpoints/{path}" if (grpo_type, step) == ("no_kl", "00050") else None
    return download_file(hub_url("rasbt/qwen3-from-scratch-grpo-checkpoints", path), out_dir, backup_url=backup)


def download_qwen3_distill_checkpoints(distill_type="deepseek_r1", step="06682", out_dir="."):
    """Download the checkpoint distilled from `distill_type`'s answers after `step` and return its path."""
    if distill_type not in DISTILL_STEPS:
        raise ValueError(f"distill_type must be one of {list(DISTILL_STEPS)}, not {distill_type!r}")
    steps, step = DISTILL_STEPS[distill_type], str(step).zfill(5) if str(step).isdigit() else str(step)
    if step not in steps:
        raise ValueError(f"step must be one of {list(steps)} for {distill_type} (the end of each epoch), not {step!r}")
    path = f"ch08_distill_{distill_type}/checkpoints/qwen3-0.6B-distill-step{step}-epoch{steps.index(step) + 1}.pth"
    return download_file(hub_url("rasbt/qwen3-from-scratch-distill-checkpoints", path), out_dir)


def _weight_files(folder):
    """An official checkpoint's safetensors files: model.safetensors, or the shards its index lists."""
    index = Path(folder) / "model.safetensors.index.json"
    return sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]


def download_qwen3(repo_id="Qwen/Qwen3-0.6B-Base", out_dir=None, revision="main"):
    """Download an official Qwen3 checkpoint (config, tokenizer, safetensors weights, sharded or
    not) and return its folder. A copy already in the Hugging Face cache is used as it is."""
    if (cached := hf_cache_snapshot(repo_id, revision)) is not None:
        print(f"✓ {repo_id} found in the Hugging Face cache: {cached}")
        return cached
    out_dir = Path(out_dir or Path("qwen3") / repo_id.replace("/", "--"))
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        download_file(hub_url(repo_id, name, revision), out_dir)
    if not (out_dir / "model.safetensors").is_file():
        try:  # is there an index of shards?
            download_file(hub_url(repo_id, "model.safetensors.index.json", revision), out_dir)
        except DownloadError as exc:
            if exc.status != 404:
                raise
    for name in _weight_files(out_dir):
        download_file(hub_url(repo_id, name, revision), out_dir)
    return out_dir


# Official (transformers) name -> the book's name; no transposes: both store Linear weights (out, in).
HF_TO_BOOK_NAMES = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "final_norm.scale",
                    "lm_head.weight": "out_head.weight"}
HF_TO_BOOK_LAYER_NAMES = {
    "self_attn.q_proj.weight": "att.W_query.weight",
    "self_attn.k_proj.weight": "att.W_key.weight",
    "self_attn.v_proj.weight": "att.W_value.weight",
    "self_attn.o_proj.weight": "att.out_proj.weight",
    "self_attn.q_norm.weight": "att.q_norm.scale",
    "self_attn.k_norm.weight": "att.k_norm.scale",
    "input_layernorm.weight": "norm1.scale",
    "post_attention_layernorm.weight": "norm2.scale",
    "mlp.gate_proj.weight": "ff.fc1.weight",
    "mlp.up_proj.weight": "ff.fc2.weight",
    "mlp.down_proj.weight": "ff.fc3.weight",
}


def hf_to_book_name(name):
    """'model.layers.3.mlp.gate_proj.weight' -> 'trf_blocks.3.ff.fc1.weight'; None if unknown."""
    if name in HF_TO_BOOK_NAMES:
        return HF_TO_BOOK_NAMES[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in HF_TO_BOOK_LAYER_NAMES:
        return f"trf_blocks.{match.group(1)}.{HF_TO_BOOK_LAYER_NAMES[match.group(2)]}"
    return None


# safetensors, the official checkpoints' format, is simple enough to read in a few lines and,
# unlike a pickled .pth, cannot run code when loaded:
#     8 bytes: N, the header's length (little-endian u64)
#     N bytes: JSON {name: {"dtype": "BF16", "shape": [1024, 3072], "data_offsets": [begin, end]}, ...}
#     the raw little-endian tensor bytes, offsets counted from the end of the header
# We map the file into memory instead of reading it: a tensor is a view of the file's pages, and
# the operating system reads those pages only when they are used.
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}  # weights' dtypes


def read_safetensors(path):
    """Return {name: tensor} for a .safetensors file, memory-mapped and bounds-checked."""
    path, file_size = Path(path), Path(path).stat().st_size

    def invalid(problem):
        return ValueError(f"{path} is not a valid safetensors file: {problem}. Delete it and download it again")

    with open(path, "rb") as file:
        header_len = int.from_bytes(file.read(8), "little")
        if file_size < 8 or header_len > file_size - 8:
            raise invalid(f"its header length {header_len} runs beyond the file's {file_size} bytes (truncated)")
        try:
            header = json.loads(file.read(header_len))
        except ValueError as exc:
            raise invalid(f"its header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise invalid(f"its header is a JSON {type(header).__name__}, not an object of tensors")
        # ACCESS_COPY: private pages, so the tensors are writable without ever changing the file
        data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    data_start, data_size = 8 + header_len, file_size - 8 - header_len
    header.pop("__metadata__", None)

    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
            num_bytes = math.prod(shape) * (dtype.itemsize if dtype else 0)
        except (KeyError, TypeError, ValueError):
            raise invalid(f"the header entry of {name!r} is malformed: {entry}") from None
        if dtype is None:
            raise invalid(f"tensor {name!r} has unknown dtype {entry['dtype']!r}")
        if not 0 <= begin <= end == begin + num_bytes <= data_size:
            raise invalid(f"tensor {name!r} of shape {shape} needs {num_bytes} bytes, its offsets give bytes "
                          f"{begin}..{end} of the {data_size} bytes of data (truncated?)")
        tensors[name] = (torch.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=data_start + begin)
                         .view(shape) if num_bytes else torch.empty(shape, dtype=dtype))
    return tensors


def load_qwen3(path, device=None, dtype=None):
    """A Qwen3Model in eval mode from an official checkpoint folder (config.json and safetensors
    files) or one of the book's .pth files (sizes read off its shapes). The model is built on the
    "meta" device (shapes without memory) and the file's tensors are then assigned to it, so
    loading holds one copy of the weights, the memory-mapped file's (on the CPU, in its dtype)."""
    path = Path(path)
    if path.suffix == ".pth" and path.is_file():
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # no pickled code
        except Exception as exc:
            raise ValueError(f"{path} is not a readable PyTorch state dict ({exc}): "
                             f"delete it and download it again") from None
        cfg = _config_from_book_state_dict(state, path)
    elif (path / "config.json").is_file():
        cfg = qwen3_config_from_hf(json.loads((path / "config.json").read_text()))
        files = [path / name for name in _weight_files(path)]
        if missing := [file for file in files if not file.is_file()]:
            raise FileNotFoundError(f"{missing[0]} is missing: download the checkpoint again")
        state = {hf_to_book_name(name) or f"(unknown) {name}": tensor
                 for file in files for name, tensor in read_safetensors(file).items()}
    else:
        problem = ("does not exist" if not path.exists() else "has no config.json" if path.is_dir()
                   else "is not a .pth file")
        raise FileNotFoundError(f"{path} {problem}: give a checkpoint folder (config.json and safetensors "
                                f"files) or one of the book's .pth files")
    cfg["dtype"] = dtype or cfg["dtype"]

    # The output head: a file that stores none ties it to the embedding (official checkpoints of
    # the small models); the book's .pth files store both, and so get two matrices, as in the book.
    cfg["tie_word_embeddings"] = "out_head.weight" not in state
    if cfg["tie_word_embeddings"] and "tok_emb.weight" in state:
        state["out_head.weight"] = state["tok_emb.weight"]
    with torch.device("meta"):
        model = Qwen3Model(cfg)
    _check_checkpoint(model, state, path)
    own = model.state_dict()  # each tensor takes the dtype of the model's own (norm scales keep theirs)
    state = {name: tensor.to(own[name].dtype) for name, tensor in state.items()}
    if not cfg["tie_word_embeddings"] and state["out_head.weight"].data_ptr() == state["tok_emb.weight"].data_ptr():
        state["out_head.weight"] = state["out_head.weight"].clone()  # saved from a tied model: train them apart
    model.load_state_dict(state, assign=True)
    if cfg["tie_word_embeddings"]:
        model.out_head.weight = model.tok_emb.weight  # assign=True gave each name a Parameter of its own
    return model.to(device).eval()


def load_tokenizer_only(which_model, local_dir="qwen3"):
    """Chapter 3's: the "base" or "reasoning" tokenizer; the reasoning one wraps each prompt as a chat turn."""
    if which_model not in BOOK_FILES:
        raise ValueError(f"which_model must be 'base' or 'reasoning', not {which_model!r}")
    download_qwen3_small(which_model, tokenizer_only=True, out_dir=local_dir)
    chat = which_model == "reasoning"
    return Qwen3Tokenizer(Path(local_dir) / BOOK_FILES[which_model][1], apply_chat_template=chat,
                          add_generation_prompt=chat, add_thinking=chat)


def load_model_and_tokenizer(which_model, device, use_compile, local_dir="qwen3"):
    """Chapter 3's: the book's "base" or "reasoning" 0.6B model on `device` (compiled if use_compile)."""
    tokenizer = load_tokenizer_only(which_model, local_dir)
    download_qwen3_small(which_model, out_dir=local_dir)
    model = load_qwen3(Path(local_dir) / BOOK_FILES[which_model][0], device)
    if use_compile:  # section 2.9: current_pos an input of the graph, not a constant compiled per token;
        model = torch.compile(model)  # the flag holds for this model's calls (the book sets it process-wide)
        model.forward = torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True)(model.forward)
    return model, tokenizer


def load_hf_weights_into_qwen(model, param_config, params):
    """The book's appendix D: copy official weights {transformers name: tensor} into the model's own
    tensors, in its dtype, tying the head where "lm_head.weight" is absent; nothing is copied unless
    every tensor fits. `param_config`, the model's config, is kept for the book's signature."""
    state = {hf_to_book_name(name) or f"(unknown) {name}": tensor for name, tensor in params.items()}
    if "out_head.weight" not in state and "tok_emb.weight" in state:
        state["out_head.weight"] = state["tok_emb.weight"]
    _check_checkpoint(model, state, "the given weights")
    if "lm_head.weight" not in params:
        model.out_head.weight = model.tok_emb.weight
    model.load_state_dict(state)
    return model


def _config_from_book_state_dict(state, path):
    """A book .pth file carries no config: read the sizes off its tensors' shapes. What shapes
    cannot tell (context length, RoPE base) is the same for every Qwen3 size: take the 0.6B's."""
    try:
        vocab_size, emb_dim = state["tok_emb.weight"].shape
        head_dim = state["trf_blocks.0.att.q_norm.scale"].shape[0]
        return {**QWEN_CONFIG_06_B, "vocab_size": vocab_size, "emb_dim": emb_dim, "head_dim": head_dim,
                "n_layers": 1 + max(int(name.split(".")[1]) for name in state if name.startswith("trf_blocks.")),
                "n_heads": state["trf_blocks.0.att.W_query.weight"].shape[0] // head_dim,
                "n_kv_groups": state["trf_blocks.0.att.W_key.weight"].shape[0] // head_dim,
                "hidden_dim": state["trf_blocks.0.ff.fc1.weight"].shape[0], "dtype": state["tok_emb.weight"].dtype}
    except (KeyError, AttributeError, ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a Qwen3 state dict in the book's names "
                         f"(cannot read its sizes: {type(exc).__name__} {exc})") from None


def _check_checkpoint(model, state, path):
    """Refuse a checkpoint that does not fit the model, before anything is loaded."""
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    problems = {"tensors missing": sorted(set(expected) - set(state)),
                "unexpected tensors": sorted(set(state) - set(expected)),
                "wrong shapes": [f"{name} is {tuple(state[name].shape)}, the config wants {tuple(shape)}"
                                 for name, shape in expected.items() if name in state and state[name].shape != shape]}
    if any(problems.values()):
        raise ValueError(f"{path} does not fit a Qwen3 model with {model.cfg['n_layers']} layers and emb_dim "
                         f"{model.cfg['emb_dim']}: " + "; ".join(f"{len(names)} {what}, e.g. {names[:2]}"
                                                                  for what, names in problems.items() if names) +
                         ". Is it a complete Qwen3 dense checkpoint, matching its config?")


# =============================================================================================
# 6. Generation (chapter sections 2.6-2.9)
# An LLM writes one token at a time (figure 2.10): run the model on the tokens so far, take the
# scores of the last position (figure 2.11), pick a token (the highest score: "greedy", figure
# 2.12), append it, repeat. With a KV cache (section 2.8) only the first call reads the whole
# prompt (the "prefill"); each later call feeds just the newest token. The loops below are the
# chapter's, as running code, for any model that follows the book's protocol (model.cfg,
# model.reset_kv_cache(), model(ids, cache=...)): the book's model, ours, or ours compiled with
# torch.compile as in section 2.9. Section 7's FastGenerator runs the same loop faster.
# =============================================================================================


def sample_next_token(logits, temperature=0.0, top_k=None, top_p=None):
    """Scores of the last position (b, vocab_size) -> next token ids (b, 1).

    temperature 0 (or None, as in chapter 4) is greedy (argmax, figure 2.12). Sampling comes from
    chapter 4 (top-k is not in the book): divide the scores by the temperature (below 1: sharper,
    above 1: flatter), keep the top_k highest and/or the fewest tokens whose probabilities add up
    to top_p, and draw one at random (torch.manual_seed makes the draw reproducible).
    """
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be 0 or None (greedy) or positive, not {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None for no limit), not {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None for no limit), not {top_p}")
    if not temperature:  # in float32 (exact): PyTorch's argmax over bfloat16 is several times slower
        return logits.float().argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, -torch.inf)  # ties with the k-th stay in
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # stable: tied tokens keep the lower id first, whatever the sort kernel
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        # chapter 4's rule: a token stays while the tokens before it hold less than top_p of the
        # mass, so the first always stays and an exact tie at top_p is dropped
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, num_samples=1)


def check_generation_args(model, token_ids, max_new_tokens):
    """Refuse, with a clear message, what would otherwise fail deep inside PyTorch."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2:
        shape = tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise ValueError(f"token_ids must be a tensor of shape (batch, tokens), got {shape}: "
                         f"use torch.tensor([tokenizer.encode(prompt)])")
    if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be integers, got {token_ids.dtype}: use torch.tensor([ids]) "
                         f"with ids from tokenizer.encode, or .long()")
    if token_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a whole number >= 0, not {max_new_tokens!r}")
    # The book's protocol needs .cfg only for the KV cache's n_layers: a stand-in model without
    # one (as the book's own tests use) skips the checks that read its sizes.
    cfg = getattr(model, "cfg", None) or {}
    vocab_size, context_length = cfg.get("vocab_size"), cfg.get("context_length")
    if vocab_size is not None and not 0 <= token_ids.min() <= token_ids.max() < vocab_size:
        raise ValueError(f"token_ids holds ids from {int(token_ids.min())} to {int(token_ids.max())}, but the "
                         f"vocabulary has ids 0..{vocab_size - 1}: encode with this model's tokenizer")
    if context_length is not None and token_ids.shape[1] + max_new_tokens > context_length:
        raise ValueError(f"the prompt ({token_ids.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) "
                         f"exceed the context length of {context_length}: shorten one of them")


def is_eos(next_token, eos_token_id):
    """True when every row of next_token (b, 1) is an end-of-sequence id. eos_token_id is an id,
    a list of ids (chat models end with either of two), or None. As in the book, a batch stops
    only when all its rows end at the same step; a row that ends earlier keeps generating."""
    if eos_token_id is None:
        return False
    return bool(torch.isin(next_token, torch.tensor(eos_token_id, device=next_token.device)).all())


@torch.inference_mode()
def generate_text_basic_stream(model, token_ids, max_new_tokens, eos_token_id=None, **sampling):
    """Yield new tokens (b, 1) one by one, running the model on the whole sequence each step.
    sampling: temperature, top_k, top_p (see sample_next_token; default: greedy)."""
    check_generation_args(model, token_ids, max_new_tokens)
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(token_ids)[:, -1]                       # (b, vocab_size): the last position
        next_token = sample_next_token(logits, **sampling)     # (b, 1)
        if is_eos(next_token, eos_token_id):
            break
        yield next_token
        token_ids = torch.cat([token_ids, next_token], dim=1)  # (b, T + 1)


@torch.inference_mode()
def generate_text_basic_stream_cache(model, token_ids, max_new_tokens, eos_token_id=None, **sampling):
    """Yield new tokens (b, 1) one by one, feeding the model only the newest token after the
    prompt: everything before it is in the KV cache (section 2.8). Sampling as above."""
    check_generation_args(model, token_ids, max_new_tokens)
    model.eval()
    cache = KVCache(n_layers=model.cfg["n_layers"])
    model.reset_kv_cache()
    logits = model(token_ids, cache=cache)[:, -1]              # the prompt: fills the cache
    for _ in range(max_new_tokens):
        next_token = sample_next_token(logits, **sampling)
        if is_eos(next_token, eos_token_id):
            break
        yield next_token
        logits = model(next_token, cache=cache)[:, -1]         # one new position


def generate_text_basic(model, token_ids, max_new_tokens, eos_token_id=None, **sampling):
    """Return the new tokens, (b, n), generated without a cache."""
    tokens = generate_text_basic_stream(model, token_ids, max_new_tokens, eos_token_id, **sampling)
    return concat_new_tokens(list(tokens), token_ids)


def generate_text_basic_cache(model, token_ids, max_new_tokens, eos_token_id=None, **sampling):
    """Return the new tokens, (b, n), generated with a KV cache."""
    tokens = generate_text_basic_stream_cache(model, token_ids, max_new_tokens, eos_token_id, **sampling)
    return concat_new_tokens(list(tokens), token_ids)


def concat_new_tokens(new_tokens, token_ids):
    """A list of (b, 1) tokens -> (b, n); (b, 0) when the list is empty."""
    return torch.cat(new_tokens, dim=1) if new_tokens else token_ids[:, :0]


def generate_stats(output_token_ids, tokenizer, start_time, end_time):
    """Print how fast a generation ran, as the chapter's does: time, tokens per second and, on
    CUDA or XPU, the peak memory (whose counter is then reset for the next measurement).
    `tokenizer` is unused; it is kept for the book's signature. Section 7's speed_report gives
    more figures."""
    total_time = end_time - start_time
    print(f"\n\nTime: {total_time:.2f} sec")
    print(f"{int(output_token_ids.numel() / total_time)} tokens/sec")
    for name in ("cuda", "xpu"):
        backend = getattr(torch, name, None)
        if backend is not None and backend.is_available():
            backend.synchronize()
            print(f"Max {name.upper()} memory allocated: {backend.max_memory_allocated() / 1024**3:.2f} GB")
            backend.reset_peak_memory_stats()


# =============================================================================================
# 7. Speed and memory, beyond the chapter
# The chapter's loops are right but leave speed on the table. The prefill multiplies each weight
# matrix by many token vectors at once: arithmetic is its limit. A decode step multiplies it by one
# vector per row, two operations per weight read: it takes at least (bytes of weights) / (memory
# bandwidth), the "roofline". FastGenerator runs the chapter's cached loop as gpt-fast does: the caller holds
# what speed keeps between calls (a KVCache allocated once per generation, the kernels measured
# fastest here, the compiled decode step); the head scores the last position only; several prompts
# run as one batch; the model and global settings are left as they were. Then come the speed
# report and int8 weights (quantize_int8, a module swap that print(model) shows).
# =============================================================================================


class float32_products(torch.overrides.TorchFunctionMode):
    """`with float32_products():` every matrix product of several bfloat16 rows on a CPU
    (F.linear, what nn.Linear calls) runs in float32 and returns bfloat16: where the CPU emulates
    bfloat16 arithmetic, several times faster. The weights stay bfloat16 in memory: each is converted
    for its product, 4096 output rows at a time so that the float32 copy stays small. The mode sees
    every torch call made inside the block, and leaves all but those products alone."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not kwargs and (len(args) == 2 or args[2] is None):  # nn.Linear passes bias=None
            x, weight = args[:2]
            if x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() > x.shape[-1]:
                x = x.float()                                                  # (..., in_features)
                pieces = [F.linear(x, rows.float()) for rows in weight.split(4096)]
                return torch.cat(pieces, dim=-1).bfloat16()                    # (..., out_features)
        return func(*args, **kwargs)


def prepacked_product(linear, rows):
    """x -> linear(x) as a compiled step with frozen weights computes it where oneDNN runs: oneDNN's kernel
    on a copy of the weight laid out ahead of time for `rows` rows, as inductor's freezing makes it."""
    weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight, rows)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


class FastestKernels:
    """`kernels = FastestKernels(model)`, then `with kernels(rows):` runs its body with the kernels
    measured fastest for products of `rows` rows (batch x tokens) by this model's weights, and restores
    the settings after. Which is faster depends on the CPU, so a CPU times both: oneDNN (Intel's "one
    Deep Neural Network library", which PyTorch calls for many CPU operations) or PyTorch's native
    kernel; and for bfloat16 weights and several rows, float32_products() or not (float32: None times
    both, True or False decides). On a GPU nothing is timed, and cuDNN's attention is left out: its
    plan for each new sequence length costs more than attending, and decoding meets one a step."""

    clock = staticmethod(time.perf_counter)

    def __init__(self, model, float32=None, rounds=4):
        self.model, self.float32, self.rounds = model, float32, rounds
        self.chosen = {}  # (rounded rows, oneDNN allowed, prepacked) -> (oneDNN on, float32 products)
        self.ran = {}     # rows -> what ran, in words, for speed_report

    @contextlib.contextmanager
    def __call__(self, rows, prepacked=False):
        onednn, cudnn_attention = torch.backends.mkldnn.enabled, torch.backends.cuda.cudnn_sdp_enabled()
        try:
            torch.backends.cuda.enable_cudnn_sdp(False)
            use_onednn, float32 = self.choose(rows, prepacked)
            torch.backends.mkldnn.enabled = use_onednn
            if self.model.tok_emb.weight.device.type == "cpu":
                self.ran[rows] = ("oneDNN" + " on prepacked weights" * prepacked if use_onednn
                                  else "PyTorch's native") + (" in float32" * float32)
            with float32_products() if float32 else contextlib.nullcontext():
                yield
        finally:
            torch.backends.mkldnn.enabled = onednn
            torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)

    @torch.inference_mode()
    def choose(self, rows, prepacked=False):
        """(oneDNN on, float32 products) for `rows` rows, timed once per power of two (rows rounded up to
        one, at most 32). Each candidate runs one block's products once untimed (oneDNN prepares its kernels),
        then `rounds` times, each time another block's (weights from memory, not a cache); its best
        time counts; after two timed rounds one twice as slow runs no more; the first stays unless another
        is over 5% faster. prepacked: for a compiled step whose weights freezing lays out for oneDNN ahead
        of time (which can make oneDNN the faster kernel where it is the slower one on weights as they are)."""
        weight, onednn = self.model.tok_emb.weight, torch.backends.mkldnn.enabled
        if weight.device.type != "cpu":
            return onednn, False
        candidates = [(onednn, False), (False, False)] if onednn else [(False, False)]
        if rows > 1 and weight.dtype == torch.bfloat16 and self.float32 is not False:
            candidates = ([] if self.float32 else candidates) + [(onednn, True)]  # float32: one kernel either way
        rows = min(1 << (rows - 1).bit_length(), 32)
        key = rows, onednn, prepacked
        if len(candidates) == 1 or key in self.chosen:
            return self.chosen.get(key, candidates[0])
        blocks = [[m for m in block.modules() if hasattr(m, "in_features")] for block in self.model.trf_blocks]
        inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=weight.dtype) for m in blocks[0]}
        best = dict.fromkeys(candidates, math.inf)
        try:
            for i in range((self.rounds + 1) * len(candidates)):  # round 0 untimed
                candidate = candidates[i % len(candidates)]
                if i < 3 * len(candidates) or best[candidate] <= 2 * min(best.values()):
                    torch.backends.mkldnn.enabled = candidate[0]
                    block = blocks[i % len(blocks)]  # nn.Linear, or Int8Linear (below)
                    products = [prepacked_product(linear, rows) if prepacked and candidate == (True, False) and
                                isinstance(linear, nn.Linear) else linear for linear in block]  # untimed
                    with float32_products() if candidate[1] else contextlib.nullcontext():
                        start = self.clock()
                        for linear, product in zip(block, products):
                            product(inputs[linear.in_features])
                        seconds = self.clock() - start
                        if i >= len(candidates):
                            best[candidate] = min(best[candidate], seconds)
        finally:
            torch.backends.mkldnn.enabled = onednn
        fastest = min(candidates, key=best.get)
        self.chosen[key] = fastest if best[fastest] < 0.95 * best[candidates[0]] else candidates[0]
        return self.chosen[key]


def _synchronize(device):
    """Wait for the accelerator to finish (its work runs asynchronously), so timings are true."""
    if device.type in ("cuda", "mps", "xpu"):
        getattr(torch, device.type).synchronize()


def prefill(model, token_ids, cache, attn_mask=None):
    """The prompts (b, T) through the model, filling the cache: the scores of their last position,
    (b, vocab_size). Its big matrix products gain little from compiling: it runs eagerly."""
    return model(token_ids, cache=cache, last_only=True, attn_mask=attn_mask)[:, -1]


def decode_one_token(model, token, cache, attn_mask=None):
    """One new token per row (b, 1) through the model, after the positions in the cache: its
    scores, (b, vocab_size). The step that torch.compile compiles."""
    return model(token, cache=cache, last_only=True, attn_mask=attn_mask)[:, -1]


class CompiledDecodeStep:
    """decode_one_token through torch.compile (section 2.9), compiled at its first call; where compiling
    fails (a CPU needs a C compiler and Python's headers, a GPU Triton), decode_one_token itself, after
    a warning naming what failed. mode="max-autotune": inductor also times its own matrix products.
    On a CPU with oneDNN on, nn.Linear weights are frozen into the compiled code, so each generation
    checks the model's weights and compiles again after a change. Each number of rows (prompts) compiles
    its own code, once: in torch 2.13 code compiled for one row failed on a padded batch."""

    def __init__(self, mode=None):  # compiled: None until the first call, False once compiling failed
        self.mode, self.compiled, self.weights, self.steps, self.prepack = mode, None, None, {}, False

    def for_weights_of(self, model, rows):
        """This step for `rows` prompts, set to compile at its first call if new; changed weights drop all (warned)."""
        weights = [(t.data_ptr(), t.dtype, t.shape, None if t.is_inference() else t._version)
                   for t in [*model.parameters(), *model.buffers()]]
        if self.compiled is not False and weights != self.weights:
            if self.weights is not None:
                warnings.warn("the model's weights changed since its decode step was compiled with copies of them: "
                              "compiling it again (while training, generate without compile=True)", stacklevel=3)
            # Frozen weights are copies: any change of a tensor's storage, dtype, shape or version (training) counts
            self.steps, self.weights = {}, weights
            self.cpu = model.tok_emb.weight.device.type == "cpu"
            self.freeze = self.cpu and any(isinstance(module, nn.Linear) for module in model.modules())
            # freezing lays those weights out for oneDNN (float32: for MKL), bfloat16 where oneDNN has kernels
            self.prepack = self.freeze and (model.tok_emb.weight.dtype == torch.float32 or
                                            torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if self.compiled is not False and rows not in self.steps:  # a copy of the code, named by its rows
            code = decode_one_token.__code__.replace(co_name=f"decode_{rows}_rows")  # (torch.compile remembers
            step = types.FunctionType(code, globals(), "decode_one_token")           # by name which sizes varied)
            self.steps[rows] = torch.compile(step, fullgraph=True, mode=self.mode)
        self.compiled = self.steps.get(rows, self.compiled)  # False once compiling failed
        return self

    def __call__(self, model, token, cache, attn_mask=None):
        if self.compiled:
            try:
                # current_pos an input, not a constant compiled again per position. CPU: "freezing" (where
                # oneDNN runs the step) prepacks the weights, "cpp_wrapper" calls kernels from C++
                with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True), \
                        torch._inductor.config.patch(freezing=self.freeze and torch.backends.mkldnn.enabled,
                                                     cpp_wrapper=self.cpu):
                    return self.compiled(model, token, cache, attn_mask)
            except torch._dynamo.exc.TorchDynamoException as exc:
                # Raised while tracing or compiling (fullgraph=True: before anything ran): the compiler's
                # failure, or the step's own error (a wrong shape), which running it eagerly raises.
                own_error = isinstance(exc, torch._dynamo.exc.TorchRuntimeError) or \
                    isinstance(exc.__cause__ or exc.__context__, torch._dynamo.exc.ObservedException)
                if not own_error:
                    cause = getattr(exc, "inner_exception", exc)  # what the compiler itself raised
                    warnings.warn(f"torch.compile failed, running without it ({type(cause).__name__}: "
                                  f"{(str(cause).strip().splitlines() or [''])[0][:160]})", stacklevel=2)
                    self.compiled, self.prepack, self.steps = False, False, {}
        return decode_one_token(model, token, cache, attn_mask)


class FastGenerator:
    """The chapter's cached loop for our Qwen3Model, made fast: generate_text_basic_cache's tokens, up to rounding.

        generator = FastGenerator(model, compile=True)   # held by the caller, reused across calls
        new_tokens = generator.generate(token_ids, max_new_tokens=64)
        answers = generator.generate([tokenizer.encode(q) for q in questions], max_new_tokens=64)

    Several prompts run as one batch: a decode step reads every weight once however many rows it
    serves. compile: True or "max-autotune" (CompiledDecodeStep). float32_products: None (timed), True, False.
    """

    def __init__(self, model, compile=False, float32_products=None):
        self.model, self.cache = model, KVCache(n_layers=model.cfg["n_layers"])
        self.kernels = FastestKernels(model, float32_products)
        self.compiled = CompiledDecodeStep(None if compile is True else compile) if compile else None

    @torch.inference_mode()
    def stream(self, prompts, max_new_tokens, eos_token_id=None, temperature=0.0, top_k=None, top_p=None,
               timings=None):
        """Yield the new tokens step by step, each step a tensor (b, 1): one token per row.

        prompts: token ids (b, T), or b lists of ids of any lengths. eos_token_id: an id or a list; each
        row ends at its own, not yielded, and then yields -1 (no token) until every row ended. temperature,
        top_k, top_p: sampling per row (default: greedy). timings: a dict to fill with prompt_tokens,
        prefill_s, steps, new_tokens (every row's), decode_tokens and decode_s (after each row's first
        token), and kernels (what ran, for products of how many rows).
        """
        model = self.model
        token_ids, attn_mask = left_padded(prompts, model.tok_emb.weight.device)  # (b, T), (b, T) or None
        check_generation_args(model, token_ids, max_new_tokens)
        decode = self.compiled.for_weights_of(model, len(token_ids)) if self.compiled else decode_one_token
        eos = torch.tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long, device=token_ids.device)
        ended = torch.zeros_like(token_ids[:, :1], dtype=torch.bool)  # (b, 1)
        self.cache.max_len = token_ids.shape[1] + max_new_tokens     # allocated once, for every position
        self.cache.reset()
        model.reset_kv_cache()
        self.kernels.ran = {}
        start = time.perf_counter()
        with self.kernels(token_ids.numel()):  # rows: batch x tokens
            logits = prefill(model, token_ids, self.cache, attn_mask)  # (b, vocab_size)
        for step in range(max_new_tokens):
            next_token = sample_next_token(logits, temperature, top_k, top_p)  # (b, 1)
            if timings is not None:
                _synchronize(token_ids.device)
                if step == 0:
                    real = token_ids.numel() if attn_mask is None else int(attn_mask.sum())
                    timings.update(prompt_tokens=real, prefill_s=time.perf_counter() - start, new_tokens=0,
                                   kernels=self.kernels.ran)
                timings["new_tokens"] += int((~ended).sum())  # the rows still generating
                timings.update(steps=step + 1, decode_tokens=timings["new_tokens"] - len(ended),
                               decode_s=time.perf_counter() - start - timings["prefill_s"])
            ended |= torch.isin(next_token, eos)
            if ended.all():
                break
            yield next_token.masked_fill(ended, -1)
            if step == max_new_tokens - 1:
                break  # no forward pass for a token nobody asks for
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1), value=True)  # (b, S + 1): the new token is real
            with self.kernels(next_token.numel(), decode is not decode_one_token and decode.prepack):  # rows: b
                logits = decode(model, next_token, self.cache, attn_mask)

    def generate(self, prompts, max_new_tokens, eos_token_id=None, **options):
        """Return the new tokens: for a tensor of prompts a tensor (b, n), -1 after a row's end; for a
        list of prompts a list of lists, each row's tokens up to its end. Options as for stream()."""
        tokens = self.stream(prompts, max_new_tokens, eos_token_id, **options)
        if isinstance(prompts, torch.Tensor):
            return concat_new_tokens(list(tokens), prompts)
        rows = concat_new_tokens(list(tokens), torch.zeros(len(prompts), 0, dtype=torch.long)).tolist()
        return [[token for token in row if token != -1] for row in rows]


def speed_report(output_token_ids, start_time, end_time, timings=None, model=None):
    """Print, and return as a dict, what the command line shows after a generation: time, tokens per
    second (every row's; -1 marks no token); with FastGenerator's timings, time to first token, decode
    speed, the kernels that ran, and with the model the bandwidth decoding reached; peak memory."""
    total_s, tokens = end_time - start_time, int((output_token_ids >= 0).sum())
    stats = {"time_s": total_s, "tokens": tokens, "tokens_per_s": tokens / total_s}
    lines = [f"\n\nTime: {total_s:.2f} sec", f"{stats['tokens_per_s']:.1f} tokens/sec"]
    if timings and timings.get("new_tokens"):
        stats.update(time_to_first_token_s=timings["prefill_s"],
                     prefill_tokens_per_s=timings["prompt_tokens"] / timings["prefill_s"])
        lines.append(f"time to first token: {timings['prefill_s']:.2f} s "
                     f"(prefill: {stats['prefill_tokens_per_s']:.1f} tokens/s for {timings['prompt_tokens']} tokens)")
        if timings["decode_tokens"] > 0 and timings["decode_s"] > 0:
            stats["decode_tokens_per_s"] = timings["decode_tokens"] / timings["decode_s"]
            lines.append(f"decode: {stats['decode_tokens_per_s']:.1f} tokens/s")
            if model is not None:  # one step reads every weight once, whatever the number of rows
                per_step = weight_bytes_per_token(model)
                stats["bandwidth_gb_per_s"] = per_step * (timings["steps"] - 1) / timings["decode_s"] / 1e9
                lines.append(f"memory bandwidth: {stats['bandwidth_gb_per_s']:.1f} GB/s "
                             f"({per_step / 1e9:.2f} GB of weights read per step)")
    if timings and timings.get("kernels"):
        stats["kernels"] = timings["kernels"]
        lines.append("kernels (measured fastest): " + "; ".join(
            f"{what} for {rows} row{'s' * (rows > 1)} (batch x tokens)" for rows, what in timings["kernels"].items()))
    peak, what = peak_memory(output_token_ids.device)
    if peak is not None:
        stats["peak_memory_gb"] = peak / 2**30
        lines.append(f"peak memory: {peak / 2**30:.2f} GB ({what})")
    print("\n".join(lines))
    return stats


def weight_bytes_per_token(model):
    """Bytes of weights one decoding step reads: every weight once, but one row of the RoPE tables
    and of the embedding table (unless it doubles as the output head)."""
    skip = {model.cos.data_ptr(), model.sin.data_ptr()}
    if model.out_head.weight is not model.tok_emb.weight:
        skip.add(model.tok_emb.weight.data_ptr())
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()] if t.data_ptr() not in skip}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def peak_memory(device):
    """(bytes, what was measured): the accelerator's peak allocation, or this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, "not measured on this system"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak * (1 if sys.platform == "darwin" else 1024), "peak RSS of this process"


# Smaller weights: int8 (not in the book). Each Linear weight as int8 with one scale per output row
# (w ~= w_int8 * scale, scale = max|row| / 127) halves the linear layers' memory and the bytes a
# decode step reads; decoding gets faster where the CPU's int8 kernel keeps pace with memory.

class Int8Linear(nn.Module):
    """A bias-free Linear layer with int8 weights and per-output-row scales."""

    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.detach().float()  # (out_features, in_features)
        # round the scales to the weights' dtype first, then quantize with the scales in use
        scales = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).to(linear.weight.dtype)  # (out_features,)
        self.register_buffer("weight", torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)                                   # (b * T, in_features)
        if rows.shape[0] <= 4 and x.device.type in ("cpu", "mps"):
            # A few rows (decoding): a fused kernel multiplies by the int8 weights directly
            out = torch._weight_int8pack_mm(rows, self.weight, self.scales)
        else:  # the plain idea, x @ (w_int8 * scale).T == (x @ w_int8.T) * scale, faster for more rows
            out = F.linear(rows, self.weight.to(rows.dtype)) * self.scales  # (in float32_products(), in float32)
        return out.view(*x.shape[:-1], self.out_features)                      # (b, T, out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model):
    """Replace, in place, every Linear of the blocks and the output head by an Int8Linear.
    A tied head gets its own int8 copy; the embedding keeps its dtype for the lookup."""
    for block in model.trf_blocks:
        for parent in (block.att, block.ff):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    model.out_head = Int8Linear(model.out_head)
    return model


# =============================================================================================
# 8. The command line: `python qwen3_minimal.py`
# With no arguments: download the chapter's 0.6B base model, stream a greedy completion of the
# chapter's prompt and print the stats; `--help` lists the rest (chat, larger official models,
# several prompts, sampling, compile, int8). Pasted into a notebook cell, it runs the same demo.
# =============================================================================================

DEFAULT_PROMPT = "Explain large language models."
EXAMPLES = """examples:
  python qwen3_minimal.py --prompt "Give me a haiku about autumn." --temperature 0.7 --top-p 0.9
  python qwen3_minimal.py --prompt "2 + 2 =" --prompt "The capital of France is"  # several prompts, one batch
  python qwen3_minimal.py --chat                           # multi-turn chat, thinking shown apart
  python qwen3_minimal.py --model Qwen/Qwen3-1.7B --chat   # an official checkpoint from the hub
  python qwen3_minimal.py --random-weights --compile       # offline: the 0.6B shape, random weights
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Qwen3 from scratch: download a model, then generate text or chat.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", action="append", help=f"text to continue (default: {DEFAULT_PROMPT!r}); give "
                        f"it more than once to answer several prompts in one batch")
    parser.add_argument("--model", help="'base' (default) or 'reasoning' (the book's 0.6B files), an official "
                                         "repo id such as Qwen/Qwen3-1.7B, or a checkpoint folder or .pth file")
    parser.add_argument("--out-dir", default="qwen3", help="where downloads go (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps, ... (default: the best available)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="weights' dtype "
                        "(default: the checkpoint's, bfloat16); float32 takes twice the memory")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 128, or 2048 per chat turn")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); e.g. 0.6 to sample")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens up to this mass")
    parser.add_argument("--seed", type=int, default=123, help="random seed for sampling (and random weights)")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (the first run waits for it)")
    parser.add_argument("--int8", action="store_true", help="int8 linear weights: less memory, slightly less exact")
    parser.add_argument("--chat", action="store_true", help="interactive multi-turn chat (uses 'reasoning' by default)")
    parser.add_argument("--no-think", action="store_true", help="chat models: answer without thinking first")
    parser.add_argument("--random-weights", action="store_true",
                        help="no download: the 0.6B shape with random weights, to try the pipeline and its speed")
    # A notebook kernel is started with its own arguments (-f kernel.json): they are not ours.
    in_notebook = "ipykernel" in sys.modules or Path(sys.argv[0]).name.endswith("kernel_launcher.py")
    return parser.parse_args(argv if argv is not None else [] if in_notebook else sys.argv[1:])


def load_from_args(args, device):
    """(model, tokenizer) as --model, --random-weights and --dtype say; random weights come with
    a tokenizer only where one was downloaded before (else None)."""
    dtype = getattr(torch, args.dtype) if args.dtype else None
    name, out_dir = args.model or ("reasoning" if args.chat else "base"), Path(args.out_dir)
    if args.random_weights:
        with torch.device(device):  # (the RoPE tables are built on the CPU: .to(device) moves them)
            model = Qwen3Model({**QWEN_CONFIG_06_B, "dtype": dtype or torch.bfloat16}).to(device).eval()
        tokenizer_file = out_dir / BOOK_FILES.get(name, BOOK_FILES["base"])[1]
        return model, Qwen3Tokenizer(tokenizer_file) if tokenizer_file.is_file() else None
    path = Path(name)
    if name in BOOK_FILES:
        download_qwen3_small(kind=name, out_dir=out_dir)
        path = out_dir / BOOK_FILES[name][0]
    elif not path.exists():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
            raise ValueError(f"--model {name!r} is none of: base, reasoning, an official repo id such as "
                             f"Qwen/Qwen3-1.7B, an existing checkpoint folder or .pth file")
        path = download_qwen3(name, out_dir / name.replace("/", "--"))
    # An official folder holds its tokenizer.json; the book's tokenizer lies beside its .pth file.
    tokenizer_file = path / "tokenizer.json" if path.is_dir() else \
        path.parent / BOOK_FILES["reasoning" if "reasoning" in path.name else "base"][1]
    return load_qwen3(path, device, dtype), Qwen3Tokenizer(tokenizer_file)


def stream_reply(generator, tokenizer, prompts, args, max_new_tokens):
    """New tokens (b, n), -1 after a row's end, and timings for prompts (ids (b, T) or lists). One prompt's text is
    printed as it comes, its thinking set apart; several run as one batch, main() prints each answer."""
    timings, new_tokens = {}, []
    eos = tokenizer.eos_token_ids if tokenizer else None
    tokens = generator.stream(prompts, max_new_tokens, eos, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, timings=timings)
    decode = tokenizer.stream_decoder() if tokenizer else (lambda token: f" {int(token)}")
    dim, plain = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    for token in tokens:
        new_tokens.append(token)
        if len(prompts) == 1:
            piece = decode(token).replace("<think>", f"{dim}[thinking] ").replace("</think>", f"{plain}\n[answer] ")
            print(piece, end="", flush=True)
    print(plain, end="")
    return concat_new_tokens(new_tokens, torch.zeros(len(prompts), 0, dtype=torch.long)), timings


def chat(generator, tokenizer, args, device):
    """A multi-turn chat: the whole conversation is re-encoded with the chat template each turn."""
    print(f"Chat with Qwen3, thinking {'off' if args.no_think else 'on'}. An empty line or Ctrl-D ends it.")
    messages = []
    while True:
        try:
            user = input("\nyou> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(messages, enable_thinking=not args.no_think)
        token_ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        print("qwen> ", end="")
        reply, _ = stream_reply(generator, tokenizer, token_ids, args, args.max_new_tokens or 2048)
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
        print()


def main(argv=None):
    args = parse_args(argv)
    try:
        device = torch.device(args.device) if args.device else get_device()
        if device.type != "cpu" and not (hasattr(torch, device.type) and getattr(torch, device.type).is_available()):
            raise ValueError(f"--device {args.device}: this PyTorch sees no such device; leave --device out "
                             f"to use the best one available")
        torch.manual_seed(args.seed)  # random weights and every sampled reply, chat turns included
        model, tokenizer = load_from_args(args, device)
        if args.int8:
            quantize_int8(model)
        generator = FastGenerator(model, compile=args.compile)  # kept for every turn of a chat
        if args.chat:
            if tokenizer is None:
                raise ValueError("--chat needs a tokenizer: run once without --random-weights to download it")
            return chat(generator, tokenizer, args, device)
        is_chat_model = tokenizer is not None and tokenizer.eos_token == "<|im_end|>"
        prompts = [(tokenizer.apply_chat_template([{"role": "user", "content": text}], enable_thinking=not args.no_think)
                    if is_chat_model else text) for text in args.prompt or [DEFAULT_PROMPT]]
        ids = [tokenizer.encode(prompt) if tokenizer else list(prompt.encode("utf-8")) for prompt in prompts]
        if tokenizer is None:
            print("(no tokenizer downloaded yet: the prompt's bytes stand in for tokens, ids are printed)")
        if len(prompts) == 1:
            print(prompts[0], end="", flush=True)
        start = time.perf_counter()
        new_tokens, timings = stream_reply(generator, tokenizer, ids, args, args.max_new_tokens or 128)
        end = time.perf_counter()
        if len(prompts) > 1:  # each answer under its prompt
            for i, (prompt, row) in enumerate(zip(prompts, new_tokens.tolist())):
                answer = [token for token in row if token >= 0]
                print(f"\n[{i + 1}/{len(prompts)}] {prompt}" + (tokenizer.decode(answer) if tokenizer else str(answer)))
        speed_report(new_tokens, start, end, timings, model)
    except (DownloadError, OSError, ValueError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as exc:  # out of memory: CUDA's OutOfMemoryError, or the CPU allocator's
        if "out of memory" not in str(exc) and "can't allocate memory" not in str(exc):
            raise
        print(f"\nerror: out of memory ({str(exc).splitlines()[0][:120]}): try a smaller model, "
              f"--int8, or a device with more memory", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print()


# =============================================================================================
# 9. Appendix: downloading robustly
# Skip this on a first read: section 5 only needs "download_file(url, folder) returns the file".
# The bytes go to "<name>.incomplete", renamed once its size (and sha256, where the server gives
# one) checks out; a later run resumes it with an HTTP Range request; dropped connections and
# server errors are retried with a growing pause; every failure says what to do.
# =============================================================================================


class DownloadError(RuntimeError):
    """A download failed; the message says what to do. `status`: the server's HTTP status, if any."""
    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


def hub_url(repo_id, filename, revision="main"):
    """Where the Hugging Face hub serves a file. HF_ENDPOINT points elsewhere (a mirror)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{repo_id}/resolve/{revision}/{filename}"


def download_file(url, out_dir=".", backup_url=None, retries=5):
    """Download url into out_dir (keeping its file name) and return the file's path. Where url
    fails, backup_url (a mirror of the same file) is tried, as in the book."""
    dest = Path(out_dir) / url.rsplit("/", 1)[-1]
    if dest.is_file():  # only complete, verified files ever get their final name
        print(f"✓ {dest} already up-to-date")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _download_with_retries(url, dest, retries)
    except DownloadError as exc:
        if backup_url is None or "disk is full" in str(exc):
            raise
        print(f"{url} failed ({exc}).\nTrying the backup URL {backup_url} ...")
        try:
            return _download_with_retries(backup_url, dest, retries)
        except DownloadError as backup_exc:  # the first cause first: the backup's alone would hide it
            raise DownloadError(f"{exc}; the backup also failed: {backup_exc}", status=exc.status) from backup_exc


def _download_with_retries(url, dest, retries):
    import requests

    partial = dest.with_name(dest.name + ".incomplete")
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))  # 0.5 s, 1 s, 2 s, ...
        try:
            expected_size, expected_sha256 = _download_to(partial, url)
            break
        except (requests.exceptions.SSLError, requests.exceptions.ProxyError) as exc:
            raise DownloadError(f"could not download {url}: {type(exc).__name__}. A proxy, VPN or antivirus that "
                                f"intercepts HTTPS is the usual cause: set HTTPS_PROXY to your proxy and "
                                f"REQUESTS_CA_BUNDLE to its CA certificate, or save it from a browser as {dest}") from exc
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            last_error = DownloadError(f"cannot reach {url.split('/')[2]} for {url} ({type(exc).__name__}, "
                                       f"{retries + 1} tries): are you offline? Once downloaded, files are reused "
                                       f"without a network; set HF_ENDPOINT to use a mirror")
        except DownloadError as exc:
            if (exc.status or 0) < 500:
                raise
            last_error = exc  # the server has trouble: worth another try, as a dropped connection is
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise DownloadError(f"the disk is full while writing {partial}: free some space in "
                                    f"{dest.parent} and run again; the download resumes") from exc
            raise DownloadError(f"could not write {partial} ({exc}): check that {dest.parent} is a "
                                f"writable folder, or choose another one") from exc
    else:
        raise last_error

    size = partial.stat().st_size
    if expected_size is not None and size != expected_size:
        raise DownloadError(f"{url} gave {size} bytes, expected {expected_size}: run again to resume")
    if expected_sha256 is not None:
        digest = hashlib.sha256()
        with open(partial, "rb") as file:
            while chunk := file.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != expected_sha256:
            partial.unlink()
            raise DownloadError(f"{url} arrived corrupted (its sha256 differs from the server's) and was "
                                f"deleted: run again to download it afresh")
    os.replace(partial, dest)
    return dest


def _download_to(partial, url):
    """One attempt: append the missing bytes to `partial`. Returns the server's (size, sha256 or None)."""
    import requests

    have = partial.stat().st_size if partial.exists() else 0
    headers = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else {}
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=30) as response:
        status = response.status_code
        if status == 416 and have:  # "range not satisfiable": the partial file is as long as the file, or
            partial.unlink()  # longer (a stale one), and we cannot tell which: start over
            return _download_to(partial, url)
        if status >= 400:
            raise DownloadError(
                f"{url} does not exist (404): check the repo id, revision and file name" if status == 404 else
                f"access to {url} was denied ({status}): the repo may be gated or private; accept its terms on "
                f"the hub and set HF_TOKEN" if status in (401, 403) else
                f"{url.split('/')[2]} kept failing (HTTP {status}) for {url}: the server has trouble, try again "
                f"later" if status >= 500 else f"{url} answered HTTP {status}", status=status)
        # The hub sends large files' size and sha256 on its redirect to the storage host
        # (X-Linked-Size, X-Linked-Etag); requests keeps that answer in .history.
        linked = [r.headers for r in (*response.history, response)]  # case-insensitive dicts
        sha256 = next((h["X-Linked-Etag"] for h in linked if "X-Linked-Etag" in h), "")
        sha256 = sha256.removeprefix("W/").strip('"').lower()
        size = next((int(h["X-Linked-Size"]) for h in linked if "X-Linked-Size" in h), None)
        if status != 206:
            have = 0  # the server ignored the Range request: start over
        if size is None and "Content-Length" in response.headers:
            size = have + int(response.headers["Content-Length"])
        with open(partial, "ab" if have else "wb") as file:
            for chunk in response.iter_content(chunk_size=1 << 20):
                file.write(chunk)
                have += len(chunk)
                if size:  # "name: 37% (530 MiB / 1433 MiB)"
                    print(f"\r{partial.stem}: {have * 100 // size:3d}% ({have >> 20} MiB / {size >> 20} MiB)",
                          end="", flush=True)
        if size:
            print()
    return size, sha256 if re.fullmatch(r"[0-9a-f]{64}", sha256) else None


def hf_cache_snapshot(repo_id, revision="main"):
    """The folder of a complete checkpoint in the local Hugging Face cache, or None."""
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    repo_dir = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub")) / f"models--{repo_id.replace('/', '--')}"
    ref = repo_dir / "refs" / revision
    snapshot = repo_dir / "snapshots" / (ref.read_text().strip() if ref.is_file() else revision)
    needed = ["config.json", "tokenizer.json", *_weight_files(snapshot)]
    return snapshot if all((snapshot / name).is_file() for name in needed) else None


if __name__ == "__main__":
    main()
