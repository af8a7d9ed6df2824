"""The config contract and the prompt layout (torch-free: the shipped model's tokenizer)."""

from __future__ import annotations

import json

import pytest

from tinygptv_edge.export.checkpoints.default import default_model_dir
from tinygptv_edge.runtime.config import (
    IMAGE_PLACEHOLDER,
    ConfigError,
    LanguageConfig,
    TinyGPTVConfig,
    VisionConfig,
    full_config,
    small_config,
    tiny_config,
)
from tinygptv_edge.runtime.text.prompt import split_prompt
from tinygptv_edge.runtime.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(default_model_dir())


def test_full_config_has_real_dimensions():
    cfg = full_config()
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.heads, cfg.vision.mlp_hidden) == (
        1408,
        39,
        16,
        6144,
    )
    assert cfg.vision.num_tokens == 257 and full_config(4).vision.num_tokens == 1025
    assert (cfg.qformer.hidden, cfg.qformer.layers, cfg.qformer.num_query_tokens) == (768, 12, 32)
    assert [i for i in range(12) if cfg.qformer.has_cross_attention(i)] == [0, 2, 4, 6, 8, 10]
    lm = cfg.language
    assert (lm.hidden, lm.layers, lm.heads, lm.head_dim, lm.rotary_dim, lm.vocab_size) == (
        2560,
        32,
        32,
        80,
        32,
        51200,
    )
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.scale) == (64, 16.0, 0.25)
    assert full_config(4).prompt.first_turn("hi") == "Instruct: <Img><ImageHere></Img> hi /n Output: "


def test_stage_1_3_prompt_matches_conversation_template():
    p = full_config().prompt.first_turn("What is it?")
    assert p == (
        "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
        "provide it to you. Please answer my questions."
        "###Human: <Img><ImageHere></Img> What is it?###Assistant: "
    )


def test_config_json_round_trip_ignores_unknown_keys(tmp_path):
    cfg = tiny_config()
    data = cfg.to_dict()
    data["future_field"] = 1
    data["language"]["another"] = "x"
    (tmp_path / "c.json").write_text(json.dumps(data))
    assert TinyGPTVConfig.load(tmp_path / "c.json") == cfg


def test_config_validation_says_what_is_wrong():
    with pytest.raises(ConfigError, match="width 100 is not divisible by heads 16"):
        VisionConfig(width=100)
    with pytest.raises(ConfigError, match="llama_proj2 output 2560 != language hidden 64"):
        TinyGPTVConfig(language=LanguageConfig(hidden=64, heads=4, intermediate=128))
    with pytest.raises(ConfigError, match="stage"):
        TinyGPTVConfig(stage=5)


def test_split_prompt_puts_bos_first_and_one_slot_per_image(tok):
    seg = split_prompt(f"A{IMAGE_PLACEHOLDER}B C{IMAGE_PLACEHOLDER}", tok, 2, add_bos=True)
    assert seg.n_images == 2 and seg.texts[0] == (tok.bos_id, *tok.encode("A"))
    assert seg.texts[1] == tuple(tok.encode("B C")) and seg.texts[2] == ()
    assert seg.length(8) == len(seg.texts[0]) + len(seg.texts[1]) + 16
    assert split_prompt("A", tok, 0, add_bos=False).texts == (tuple(tok.encode("A")),)
    with pytest.raises(ConfigError, match="2 <ImageHere> slot"):
        split_prompt(f"A{IMAGE_PLACEHOLDER}B{IMAGE_PLACEHOLDER}", tok, 1, add_bos=True)
    with pytest.raises(ConfigError, match="0 <ImageHere> slot"):
        split_prompt("no image here", tok, 1, add_bos=True)


def test_shipped_prompt_turns_tokenize_as_the_text_they_join(tok):
    """A first turn, the separator and a later turn: split pieces decode back to the joined text."""
    p = small_config().prompt
    first = p.first_turn("What colour is the circle?", with_image=True)
    later = p.separator + p.turn("And the square?", with_image=False)
    seg = split_prompt(first, tok, 1, add_bos=True)
    before, after = first.split(IMAGE_PLACEHOLDER)
    assert tok.decode(list(seg.texts[0][1:])) == before and tok.decode(list(seg.texts[1])) == after
    assert IMAGE_PLACEHOLDER not in later
    assert tok.decode(list(split_prompt(later, tok, 0, add_bos=False).texts[0])) == later
