"""How completions are sampled, as one value: built once from the options and passed whole to the trainer,
`generation.generate`, the decode loop (`decoding.StaticDecoder`) and a served teacher. A new sampling option is a
field here, set in `from_options`, and read where it acts; nothing else passes it along."""

from dataclasses import dataclass, replace

BACKENDS = ("plain", "static", "compiled")


@dataclass(frozen=True)
class Sampling:
    """`temperature` None samples greedily. `suppress_ids` are never sampled (the trainer puts there the ids beyond
    the vocabulary both models share); stop ids are held back until `min_new_tokens`. `backend` is one of `BACKENDS`
    (gkd/generation.py); "compiled" sizes its static cache for `max_cache_len` tokens."""

    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float | None = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 0
    suppress_ids: tuple[int, ...] = ()
    backend: str = "plain"
    max_cache_len: int | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"generation backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "suppress_ids", tuple(sorted(set(self.suppress_ids))))

    @classmethod
    def from_options(cls, training_args, stop_token_ids, pad_token_id: int, backend: str = "plain",
                     suppress_ids=()) -> "Sampling":
        """A run's sampling: its `--temperature`, `--top_p`, `--max_new_tokens`, a cache as long as `--max_length`."""
        return cls(max_new_tokens=training_args.max_new_tokens, stop_token_ids=tuple(stop_token_ids),
                   pad_token_id=pad_token_id, temperature=training_args.temperature, top_p=training_args.top_p,
                   suppress_ids=tuple(suppress_ids), backend=backend, max_cache_len=training_args.max_length)

    def but(self, **changes) -> "Sampling":
        """A copy with some settings changed (e.g. `but(temperature=None)` for greedy)."""
        return replace(self, **changes)
