"""Next-token choice from logits: greedy or sampled, Hugging Face `generate` semantics, numpy only.

    logits (V,) --repetition penalty--> greedy: argmax
                                        sample: --min-p--> / temperature --top-k--> --top-p--> draw

The repetition penalty follows HF's `RepetitionPenaltyLogitsProcessor`: every token already generated in
this answer has its logit divided by the penalty when positive, multiplied when negative. (TinyGPT-V calls
`generate` with `inputs_embeds` only, so HF's `input_ids` hold just the generated tokens: the prompt is
not penalised.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import ConfigError, NumericsError


@dataclass(frozen=True)
class SamplingConfig:
    """`do_sample=False` is greedy decoding (temperature, top_k, top_p unused); default greedy."""

    max_new_tokens: int = 300
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off; else drop tokens less likely than min_p x the best one's probability
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None  # None: fresh entropy each answer

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            got = self.max_new_tokens
            raise ConfigError(f"SamplingConfig.max_new_tokens: expected an integer >= 1, got {got!r}")
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"SamplingConfig.do_sample: expected True or False, got {self.do_sample!r}")
        if not _number(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"SamplingConfig.temperature: expected a number > 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ConfigError(f"SamplingConfig.top_k: expected an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"SamplingConfig.top_p: expected a number in (0, 1], got {self.top_p!r}")
        if not _number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ConfigError(
                f"SamplingConfig.min_p: expected a number in [0, 1] (0 = off), got {self.min_p!r}"
            )
        if not _number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ConfigError(
                "SamplingConfig.repetition_penalty: expected a number > 0 (1 = off), "
                f"got {self.repetition_penalty!r}"
            )
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ConfigError(f"SamplingConfig.seed: expected None or an integer >= 0, got {self.seed!r}")

    def replace(self, **changes) -> SamplingConfig:
        return dataclasses.replace(self, **changes)


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def check_sampling(value: object, what: str = "sampling") -> SamplingConfig:
    """`value` if it is a SamplingConfig; a dict or anything else is a ConfigError naming the argument
    (the fields are validated by SamplingConfig itself: build one with `SamplingConfig(**fields)`)."""
    if not isinstance(value, SamplingConfig):
        raise ConfigError(
            f"{what}: expected a SamplingConfig (e.g. SamplingConfig(**fields) or TINYGPTV.replace(...)), "
            f"got {type(value).__name__} {value!r:.80}"
        )
    return value


GREEDY = SamplingConfig()
# TinyGPT-V's chat defaults (minigpt4/conversation/conversation.py `Chat.answer`)
TINYGPTV = SamplingConfig(
    max_new_tokens=300, do_sample=True, temperature=1.0, top_p=0.9, repetition_penalty=1.05
)
PRESETS = {"greedy": GREEDY, "tinygptv": TINYGPTV}


class TokenConstraint(Protocol):
    """What may come next (e.g. a grammar): `allowed(logits)` a (V,) bool mask, given the model's logits
    for this step (a constraint may steer by them, e.g. close a JSON string where the model would end its
    turn), `accept(token)` after each choice, `done()` once nothing more may follow."""

    def allowed(self, logits: np.ndarray) -> np.ndarray: ...

    def accept(self, token: int) -> None: ...

    def done(self) -> bool: ...


class Sampler:
    """Stateful chooser for one answer: holds the random generator seeded from `cfg.seed`."""

    def __init__(self, cfg: SamplingConfig):
        self.cfg = check_sampling(cfg, "Sampler cfg")
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(
        self, logits: np.ndarray, previous: Sequence[int] = (), allowed: np.ndarray | None = None
    ) -> int:
        """The next token; `allowed` (bool, up to V entries; missing ones count as False) masks the choice."""
        x = np.array(logits, dtype=np.float64).reshape(-1)  # (V,) a copy
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise NumericsError(f"{bad} of {x.size} logits are NaN or infinity: expected finite logits")
        cfg = self.cfg
        if cfg.repetition_penalty != 1.0 and len(previous):
            ids = np.unique(np.asarray(previous, dtype=np.int64))
            seen = x[ids]
            big = np.finfo(np.float64).max  # a penalty near 0 or 1e308 must not make a logit infinite
            with np.errstate(over="ignore"):
                penalized = np.where(seen > 0, seen / cfg.repetition_penalty, seen * cfg.repetition_penalty)
            x[ids] = np.clip(penalized, -big, big)
        if allowed is not None:
            keep = np.zeros(x.size, dtype=bool)
            n = min(x.size, len(allowed))
            keep[:n] = np.asarray(allowed[:n], dtype=bool)
            if not keep.any():
                raise ValueError("the token constraint allows no token")
            x = np.where(keep, np.nan_to_num(x, nan=-np.inf, posinf=np.finfo(np.float64).max), -np.inf)
        if not cfg.do_sample:
            return int(np.argmax(x))
        return self._draw(warp(x, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p))

    def _draw(self, x: np.ndarray) -> int:
        with np.errstate(over="ignore"):  # finite logits ~1e308 apart: the far ones go to -inf -> 0
            p = np.exp(x - x.max())  # masked entries are -inf -> 0
        p /= p.sum()
        return int(self.rng.choice(p.size, p=p))


def warp(x: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> np.ndarray:
    """min-p (on the logits before temperature, as llama.cpp), temperature, then top-k, then top-p
    (nucleus) masking with -inf; always keeps the best token.

    The best logit is moved to 0 before dividing, so a tiny temperature (1e-320) sends the others to
    -inf (probability 0) instead of every logit to +-inf (NaN probabilities)."""
    if min_p > 0:  # p_i < min_p * p_max  <=>  x_i - x_max < log(min_p)
        x = np.where(x - x.max() < np.log(min_p), -np.inf, x)
    with np.errstate(over="ignore", divide="ignore"):
        x = (x - x.max()) / temperature
    if 0 < top_k < x.size:
        kth = np.partition(x, -top_k)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, kind="stable")  # best first
        p = np.exp(x[order] - x[order[0]])
        p /= p.sum()
        before = np.cumsum(p) - p  # probability mass strictly ahead of each token
        drop = order[before >= top_p]  # keep the smallest prefix whose mass reaches top_p
        x = x.copy()
        x[drop] = -np.inf
    return x
