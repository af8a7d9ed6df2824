"""Test helper: write a reference PhiModel as a `tinygptv-phi2` GGUF following runtime/contract.py.

Used until the GGUF exporter (issue 4) is on this branch; written independently of it so that the two
sides are checked against the contract, not against each other's code. Quantization goes through
ggml's own `ggml_quantize_chunk` (the `gguf` package has no K-quant quantizer).
Torch-free at import (`quantize` serves the torch-free tier); the writer needs the export extra.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np

from tinygptv_edge.runtime.config import LanguageConfig, PromptConfig
from tinygptv_edge.runtime.language.ggml_runtime import load_ggml

load_ggml()  # before anything else loads ggml: its OpenMP settings only count at load time

from tinygptv_edge.runtime.contract import (  # noqa: E402
    GGUF_ARCH,
    GGUF_HPARAMS,
    PROMPT_KEYS,
    TINYGPTV_KEYS,
    gguf_key,
    language_tensors,
)


def quantize(arr: np.ndarray, type_name: str) -> np.ndarray:
    """(rows, n) float32 -> raw bytes (rows, row_size) of ggml type `type_name`."""
    from tinygptv_edge.runtime.language.ggml_runtime import load_ggml

    ggml = load_ggml()
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    rows, n = arr.shape
    type_id = getattr(ggml, f"GGML_TYPE_{type_name}")
    row_size = ggml.ggml_row_size(type_id, n)
    out = np.empty((rows, row_size), dtype=np.uint8)
    written = ggml.ggml_quantize_chunk(
        type_id, arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.ctypes.data, 0, rows, n, None
    )
    assert written == out.nbytes
    return out


def phi_gguf_tensors(phi) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array (numpy order), qkv rows reordered (heads, 3, D) -> (3, heads, D)."""
    cfg: LanguageConfig = phi.cfg
    sd = {f"language.{k}": v.detach().float().numpy() for k, v in phi.state_dict().items()}
    out = {}
    for t in language_tensors(cfg.layers):
        a = sd[t.canonical]
        if t.qkv:
            a = a.reshape(cfg.heads, 3, cfg.head_dim, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
        out[t.gguf] = a
    return out


def write_gguf(
    path: Path,
    phi,
    tokenizer_json: Path,
    wtype: str = "F32",
    prompt: PromptConfig | None = None,
    image_tokens: int = 4,
    arch: str = GGUF_ARCH,
    override: dict[str, np.ndarray] | None = None,
    skip: tuple[str, ...] = (),
) -> Path:
    """Write `phi` with matmul weights (and token_embd) in `wtype`; norms and biases F32."""
    import gguf

    cfg: LanguageConfig = phi.cfg
    prompt = prompt or PromptConfig()
    w = gguf.GGUFWriter(str(path), arch)
    for k, h in GGUF_HPARAMS.items():
        add = w.add_uint32 if h.kind == "uint32" else w.add_float32
        add(gguf_key(k, arch), getattr(cfg, h.config))
    w.add_uint32(TINYGPTV_KEYS["stage"], 3)
    w.add_uint32(TINYGPTV_KEYS["image_tokens"], image_tokens)
    for field, key in PROMPT_KEYS.items():
        w.add_string(TINYGPTV_KEYS[key], getattr(prompt, field))

    tok = json.loads(Path(tokenizer_json).read_text())
    vocab = tok["model"]["vocab"]
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    eot = vocab["<|endoftext|>"]
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)

    tensors = phi_gguf_tensors(phi)
    tensors.update(override or {})
    for name, a in tensors.items():
        if name in skip:
            continue
        if a.ndim == 2 and wtype != "F32" and a.dtype == np.float32:
            if wtype == "F16":
                w.add_tensor(name, a.astype(np.float16))
            else:
                q = quantize(a, wtype)
                w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType[wtype])
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def randomize_norms(phi, seed: int = 0) -> None:
    """Give every norm weight/bias a non-trivial value so the test sees a wrong wiring."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in phi.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
