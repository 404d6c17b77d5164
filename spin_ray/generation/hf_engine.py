"""Hugging Face `generate` engine: batched, left-padded, length-bucketed, stopping at end-of-turn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spin_ray.tokenization import ChatFormat


class SeededSampler:
    """Logits processor that samples each row with its own torch.Generator.

    HF `generate` has one global RNG, so a sampled answer would depend on which prompts share
    its batch. Here each row draws from a generator seeded per (prompt, sample): the token it
    picks is the only one left finite, and greedy decoding then takes it.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        picked = torch.stack(
            [torch.multinomial(row, 1, generator=gen)[0] for row, gen in zip(probs, self.generators, strict=True)]
        )
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0]), picked] = 0.0
        return out


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens, end-of-turn included when the model stopped by itself
    text: str  # decoded answer with the end-of-turn marker removed
    finish_reason: str  # "stop" (end-of-turn/eos) or "length" (hit max_new_tokens)


class HFEngine:
    """Answers tokenized prompts with `model.generate`.

    Prompts are sorted by length and cut into batches, so a batch carries little left padding;
    results come back in the caller's order.
    """

    def __init__(
        self,
        model,
        chat: ChatFormat,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 8,
    ):
        self.model = model.eval()
        self.chat = chat
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.batch_size = batch_size
        self.pad_id = chat.tokenizer.pad_token_id

    def _generate_batch(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> list[Completion]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        sampling = {}
        if self.temperature > 0:
            from transformers import LogitsProcessorList

            sampling = {"logits_processor": LogitsProcessorList([SeededSampler(seeds, self.temperature, self.top_p)])}
        stops = self.chat.stop_token_ids
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=stops,
                pad_token_id=self.pad_id,
                do_sample=False,
                **sampling,
            )
        completions = []
        for row in output[:, width:].tolist():
            finish = "length"
            for index, token in enumerate(row):
                if token in stops:
                    row, finish = row[: index + 1], "stop"
                    break
            text = self.chat.tokenizer.decode(row, skip_special_tokens=True).strip()
            completions.append(Completion(token_ids=row, text=text, finish_reason=finish))
        return completions

    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None = None) -> list[Completion]:
        """Answer every prompt; `seeds` (one per prompt) make sampled answers reproducible."""
        seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = self._generate_batch([prompts[i] for i in chunk], [seeds[i] for i in chunk])
            for index, completion in zip(chunk, batch, strict=True):
                results[index] = completion
        return results  # type: ignore[return-value]
