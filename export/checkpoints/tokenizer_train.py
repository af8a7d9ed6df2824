"""Train the project's byte-level BPE (GPT-2 / CodeGen / Phi-2 style) and write Phi-2's tokenizer files.

Like Phi-2's tokenizer: GPT-2 pre-tokenization regex, byte-level alphabet (every byte has a token,
so any text encodes), merges learned by frequency, `<|endoftext|>` added after the BPE vocabulary
and used as bos, eos and unk. The text it learns from ships with the project (`data/prose.txt`)
plus whatever the caller adds (the synthetic VQA questions and answers, for the default model).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tinygptv_edge.runtime.text.tokenizer import ENDOFTEXT


def shipped_text() -> list[str]:
    return resources.files("tinygptv_edge.export").joinpath("data/prose.txt").read_text().splitlines()


def train_bpe(vocab_size: int, extra_text: Iterable[str] = ()) -> Tokenizer:
    """A byte-level BPE with at most `vocab_size` tokens, `<|endoftext|>` being the last id."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = shipped_text() + list(extra_text)
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens([ENDOFTEXT])
    return tok


def save_tokenizer(tok: Tokenizer, folder: str | Path, max_length: int = 2048) -> None:
    """Write tokenizer.json, vocab.json, merges.txt and the configs, as Phi-2's folder has them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))  # vocab.json, merges.txt (the slow tokenizer's files)
    eot = {"content": ENDOFTEXT, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    config = {
        "tokenizer_class": "CodeGenTokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "added_tokens.json").write_text(json.dumps({ENDOFTEXT: tok.token_to_id(ENDOFTEXT)}) + "\n")
