"""gkd's own decode loop over a transformers model and a static KV cache, in the manner of gpt-fast's `generate.py`.

Why not transformers' `generate(cache_implementation="static")`: around its compiled forward it runs Python every
token (the 4D attention mask rebuilt, logits processors and sampling as separate small kernels, `input_ids` grown by
concatenation), which on a GPU costs as much as a small student's forward itself (docs/design-notes.md). Here a
decode step -- the forward on one token, the logit
bias, temperature, top-p and the draw -- is one function that `torch.compile` captures whole (CUDA graphs with
mode="reduce-overhead"). Its inputs have the same shapes at every step of every call: the cache holds the run's
`max_length` whatever the prompt width, the 2D attention mask spans the whole cache (causality hides the slots not
yet written), and a smaller batch is padded to the batch the cache was built for. So the decode graph is captured
once per run. On an accelerator, stops are checked every 8 tokens (each check is a host-device sync), not after every
token; on CPU, where a check costs nothing, after every token.

The prefill (the prompt's forward) runs uncompiled: its width changes from step to step and it runs once per call.
Uncompiled (the "static" backend, the default on CPU), the cache is sized to the call instead (prompt width plus new
tokens, rounded up to 32), since no graph needs fixed shapes and attending over a long empty cache costs time; there
the loop is as fast as transformers' `generate` or faster (docs/performance.md), and it runs in CI the code the
compiled path captures. `generation.generate(backend="plain")` stays as the reference; tests check both give the
same tokens.

What it does not do: logits processors other than temperature, top-p and the bias (suppressed ids, stop ids held back
until `min_new_tokens`), which are the ones gkd's sampling uses; beam search; models whose caches are not
`StaticCache`-compatible (recurrent layers). Those keep the plain backend.
"""

import logging
from functools import partial

import torch

from .sampling import Sampling

logger = logging.getLogger(__name__)

CACHE_LENGTH_BUCKET = 32  # uncompiled decoding sizes its cache to the call, rounded up to a multiple of this


def logit_bias(vocab_size: int, suppress_ids, stop_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive [V] biases for before and after `min_new_tokens`: -inf on ids that must never be sampled
    (`Sampling.suppress_ids`: the trainer puts there ids beyond the vocabulary both models share), and on stop ids
    only before."""
    always = torch.zeros(vocab_size, dtype=torch.float32)
    suppressed = [token for token in suppress_ids or () if 0 <= token < vocab_size]
    always[suppressed] = float("-inf")
    early = always.clone()
    early[[token for token in stop_ids if 0 <= token < vocab_size]] = float("-inf")
    return early, always


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' `TopPLogitsWarper`: keep the most likely ids whose probabilities sum to `top_p` (at least one)."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_indices, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_next(logits: torch.Tensor, bias: torch.Tensor, temperature: float | None, top_p: float) -> torch.Tensor:
    """Next token per row [B] from last-position logits [B, V]; greedy when `temperature` is None.

    The draw is argmax(p / E) with E ~ Exp(1) i.i.d. (gpt-fast's trick): the same distribution as
    `torch.multinomial(p)` but without its host synchronisation, so it stays inside a captured CUDA graph."""
    scores = logits.float() + bias
    if temperature is None:
        return scores.argmax(dim=-1)
    scores = scores / temperature
    if top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    probs = scores.softmax(dim=-1)
    exponential = torch.empty_like(probs).exponential_(1).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / exponential).argmax(dim=-1)


def _decode_step(model, cache, token, position, attention_mask, bias, temperature, top_p):
    """One token for every row: the whole of it is what `torch.compile` captures."""
    logits = model(
        input_ids=token, position_ids=position, attention_mask=attention_mask, past_key_values=cache, use_cache=True
    ).logits[:, -1]
    return sample_next(logits, bias, temperature, top_p)


class StaticDecoder:
    """Samples completions for one model with a static KV cache, reusing cache and decode graph across calls.

    `compile_options`: None runs the decode step eagerly; otherwise they are `torch.compile`'s arguments (for
    example `{"mode": "reduce-overhead"}` for CUDA graphs, `{"backend": "eager"}` in tests). If compiling fails on
    the first call, the decoder says why once and goes on eagerly: a run should not die on a compiler problem in a
    path that only exists for speed. `check_stop_every`: tokens between checks whether every row has stopped
    (default: 1 on CPU, 8 on accelerators).
    """

    def __init__(self, compile_options: dict | None = None, check_stop_every: int | None = None):
        self.compile_options = compile_options
        self.check_stop_every = check_stop_every
        self.caches: dict[tuple[int, int], object] = {}  # (batch size, cache length) -> StaticCache
        self._compiled_step = None
        self._compiled_ok = False  # the compiled step has completed a call at least once
        self._biases: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def compiled(self) -> bool:
        return self.compile_options is not None

    @torch.no_grad()
    def generate(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        """Completion ids [B, C], C <= max_new_tokens (shorter when every row stopped early). Rows go on sampling
        after their first stop token; the caller masks from there (`batching.mask_after_stop`)."""
        run = partial(self._generate, model, prompt_ids, prompt_mask, sampling)
        if self.compiled and not self._compiled_ok:
            try:
                return run()
            except Exception as error:  # noqa: BLE001 -- any compiler failure; the eager loop is the same computation
                logger.warning(
                    "compiling the decode step failed (%s: %s); sampling with the same loop uncompiled from now on",
                    type(error).__name__, str(error).splitlines()[0] if str(error) else "",
                )
                self.compile_options, self._compiled_step = None, None
                self.caches.clear()  # a failed capture may have left a cache half written
        return run()

    def _generate(self, model, prompt_ids, prompt_mask, sampling: Sampling):
        max_new_tokens, temperature, top_p = sampling.max_new_tokens, sampling.temperature, sampling.top_p
        min_new_tokens = sampling.min_new_tokens
        rows, prompt_width = prompt_ids.shape
        device = prompt_ids.device
        needed = prompt_width + max_new_tokens
        if self.compiled:  # one cache length for the run, so the decode graph never changes shape
            cache_len = max(sampling.max_cache_len or 0, needed)
        else:  # no graph to keep: attend over what this call needs, rounded so caches are reused
            cache_len = -(-needed // CACHE_LENGTH_BUCKET) * CACHE_LENGTH_BUCKET
        batch, cache = self._cache(model, rows, cache_len)
        if batch > rows:  # pad with copies of the last prompt: the decode graph keeps its batch size
            extra = batch - rows
            prompt_ids = torch.cat([prompt_ids, prompt_ids[-1:].expand(extra, -1)])
            prompt_mask = torch.cat([prompt_mask, prompt_mask[-1:].expand(extra, -1)])
        attention_mask = torch.ones(batch, cache_len, dtype=prompt_mask.dtype, device=device)
        attention_mask[:, :prompt_width] = prompt_mask
        position_ids = (prompt_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        early_bias, bias = self._bias(model, sampling.stop_token_ids, sampling.suppress_ids, device)
        stop_ids = torch.tensor(sampling.stop_token_ids, device=device)

        cache.reset()
        logits = model(
            input_ids=prompt_ids, position_ids=position_ids, attention_mask=attention_mask,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        ).logits[:, -1]
        token = sample_next(logits, early_bias if min_new_tokens > 0 else bias, temperature, top_p)
        tokens = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
        tokens[:, 0] = token
        finished = torch.isin(token, stop_ids)
        position = prompt_mask.long().sum(dim=1, keepdim=True)  # the first completion token's position
        step = self._step_function()
        check_every = self.check_stop_every or (1 if device.type == "cpu" else 8)
        produced = 1
        while produced < max_new_tokens:
            if produced % check_every == 0 and bool(finished[:rows].all()):
                break
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are no longer read
            token = step(
                model, cache, token[:, None], position, attention_mask,
                early_bias if produced < min_new_tokens else bias, temperature, top_p,
            ).clone()
            tokens[:, produced] = token
            finished |= torch.isin(token, stop_ids)
            position = position + 1
            produced += 1
        if self.compiled:
            self._compiled_ok = True
        return tokens[:rows, :produced]

    def _step_function(self):
        if not self.compiled:
            return _decode_step
        if self._compiled_step is None:
            options = {"dynamic": False, "fullgraph": False, **self.compile_options}
            self._compiled_step = torch.compile(_decode_step, **options)
        return self._compiled_step

    def _cache(self, model, rows: int, cache_len: int):
        """The smallest cache built so far that holds `rows` rows of `cache_len`; a new one if none does."""
        fitting = [batch for batch, length in self.caches if batch >= rows and length == cache_len]
        if fitting:
            batch = min(fitting)
            return batch, self.caches[(batch, cache_len)]
        from transformers import StaticCache

        if not self.compiled:  # uncompiled, nothing holds on to a cache's addresses: keep one at a time
            self.caches.clear()
        cache = StaticCache(config=model.config, max_cache_len=cache_len)
        self.caches[(rows, cache_len)] = cache
        return rows, cache

    def _bias(self, model, stop_token_ids, suppress_ids, device):
        vocab_size = model.get_output_embeddings().weight.shape[0]
        key = (vocab_size, tuple(suppress_ids or ()), tuple(stop_token_ids), device)
        if key not in self._biases:
            early, always = logit_bias(vocab_size, suppress_ids, stop_token_ids)
            self._biases[key] = (early.to(device), always.to(device))
        return self._biases[key]
