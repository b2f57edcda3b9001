"""Tests for qwen3_minimal.py, in the file's order: device, tokenizer, model parts, model and
configs, weights, generation, command line, and the chapter's snippets.

Nothing here touches the internet: checkpoints and tokenizers are small ones the tests write in
the real file layouts, served by a real HTTP server on 127.0.0.1. Tests that compare against
Hugging Face transformers (the reference implementation) skip where it is not installed.
"""
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
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
                  tie_word_embeddings=cfg["tie_word_embeddings"], attn_implementation=attn_implementation)
    if "rope_parameters" in inspect.signature(Qwen3Config.__init__).parameters:  # transformers 5.x
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_base"]}
    else:
        kwargs["rope_theta"] = cfg["rope_base"]
    return Qwen3Config(**kwargs)


def hf_twin(model, attn_implementation="eager"):
    """transformers' model holding the same weights as ours, copied through the name map."""
    from transformers import Qwen3ForCausalLM

    cfg = model.cfg
    hf = Qwen3ForCausalLM._from_config(hf_config(cfg, attn_implementation), dtype=cfg["dtype"]).eval()
    book_state = model.state_dict()
    hf_state = {name: book_state[q.hf_to_book_name(name)] for name in hf.state_dict()}
    hf.load_state_dict(hf_state)
    assert hf.model.rotary_emb.inv_freq.dtype == torch.float32  # the reference keeps RoPE exact
    return hf


def max_diff_per_position(a, b):
    return (a.float() - b.float()).abs().amax(dim=(0, 2))  # (T,)


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


# =============================================================================================
# 2. Tokenizer
# =============================================================================================

# (SECTION 2 TESTS)


# =============================================================================================
# 3. Model parts
# =============================================================================================

@needs_transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_transformers_bit_for_bit(dtype):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    torch.manual_seed(0)
    ours, theirs = q.RMSNorm(64, dtype=dtype), Qwen3RMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        ours.scale.copy_(1 + torch.randn(64))
        theirs.weight.copy_(ours.scale)
    x = (3 * torch.randn(2, 5, 64)).to(dtype)
    assert ours(x).dtype == dtype
    assert torch.equal(ours(x), theirs(x))


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
        assert torch.equal(q.apply_rope(x, cos, sin, offset=offset), expected)


def test_rope_rotates_pairs_of_halves_and_keeps_lengths():
    cos, sin = q.compute_rope_params(head_dim=4, theta_base=10_000, context_length=8)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    out = q.apply_rope(x, cos, sin, offset=5).flatten()
    # rotate-half pairs entry i with entry i + head_dim/2: (1, 3) and (2, 4) keep their lengths
    assert torch.allclose(out[0] ** 2 + out[2] ** 2, torch.tensor(10.0))
    assert torch.allclose(out[1] ** 2 + out[3] ** 2, torch.tensor(20.0))
    assert torch.allclose(out[0], 1 * cos[5, 0] - 3 * sin[5, 0])


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
    ids = torch.randint(0, 151_936, (2, 40), generator=torch.Generator().manual_seed(1))
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
        assert model.out_head.weight is model.tok_emb.weight
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


def test_printed_model_is_figure_2_8_and_counts_596m_unique_parameters():
    with torch.device("meta"):
        model = q.Qwen3Model(q.QWEN_CONFIG_06_B)
    assert str(model) == EXPECTED_TREE_06B
    assert sum(p.numel() for p in model.parameters()) == 596_049_920  # the head is the embedding
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


@pytest.mark.parametrize("name, emb, heads, layers, hidden, tied", [
    ("QWEN_CONFIG_06_B", 1024, 16, 28, 3072, True), ("QWEN3_CONFIG_1_7B", 2048, 16, 28, 6144, True),
    ("QWEN3_CONFIG_4B", 2560, 32, 36, 9728, True), ("QWEN3_CONFIG_8B", 4096, 32, 36, 12288, False),
    ("QWEN3_CONFIG_14B", 5120, 40, 40, 17408, False), ("QWEN3_CONFIG_32B", 5120, 64, 64, 25600, False)])
def test_configs_hold_the_official_values(name, emb, heads, layers, hidden, tied):
    cfg = getattr(q, name)
    assert (cfg["emb_dim"], cfg["n_heads"], cfg["n_layers"], cfg["hidden_dim"]) == (emb, heads, layers, hidden)
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["vocab_size"], cfg["head_dim"], cfg["n_kv_groups"], cfg["rope_base"]) == (151_936, 128, 8, 1e6)


OFFICIAL_06B_CONFIG_4X = {  # Qwen/Qwen3-0.6B config.json, as transformers 4.51 wrote it
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
    "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 1000000, "rope_scaling": None,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "eos_token_id": 151645}


def test_config_from_hf_reads_both_transformers_layouts():
    assert q.qwen3_config_from_hf(OFFICIAL_06B_CONFIG_4X) == q.QWEN_CONFIG_06_B
    layout_5x = {k: v for k, v in OFFICIAL_06B_CONFIG_4X.items() if k not in ("rope_theta", "torch_dtype")}
    layout_5x.update(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, dtype="bfloat16")
    assert q.qwen3_config_from_hf(layout_5x) == q.QWEN_CONFIG_06_B
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


def test_book_pth_state_dict_loads_strictly_and_a_tied_head_stays_tied(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    source = random_model(cfg)
    torch.save(source.state_dict(), tmp_path / "book.pth")  # both names, one matrix, as the book saves
    model = q.Qwen3Model(cfg)
    result = model.load_state_dict(torch.load(tmp_path / "book.pth", weights_only=True))  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert model.out_head.weight is model.tok_emb.weight
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(model(ids), source(ids))


def test_a_checkpoint_whose_head_differs_from_its_embedding_unties_instead_of_overwriting():
    cfg = tiny_config(tie_word_embeddings=True)
    state = random_model(cfg).state_dict()
    state["out_head.weight"] = state["out_head.weight"] + 1.0  # trained apart, as in later chapters
    model = q.Qwen3Model(cfg)
    model.load_state_dict(state)
    assert model.out_head.weight is not model.tok_emb.weight
    assert torch.equal(model.tok_emb.weight, state["tok_emb.weight"])
    assert torch.equal(model.out_head.weight, state["out_head.weight"])
