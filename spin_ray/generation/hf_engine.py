"""Hugging Face `generate` engine: batched, left-padded, length-bucketed, stopping at end-of-turn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spin_ray.tokenization import ChatFormat


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

    def _generate_batch(self, prompts: Sequence[Sequence[int]], seed: int) -> list[Completion]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        sampling = {"do_sample": False}
        if self.temperature > 0:
            sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
            torch.manual_seed(seed)
        stops = self.chat.stop_token_ids
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=stops,
                pad_token_id=self.pad_id,
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

    def generate(self, prompts: Sequence[Sequence[int]], seed: int = 0) -> list[Completion]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for index, completion in zip(chunk, self._generate_batch([prompts[i] for i in chunk], seed + start)):
                results[index] = completion
        return results  # type: ignore[return-value]
