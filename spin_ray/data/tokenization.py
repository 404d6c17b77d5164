"""Chat-template tokenization shared by generation and training, with one over-length policy.

The official SPIN code formatted prompts one way to generate and another way to train.
Here both go through `ChatFormat.prompt_ids`, so the opponent sees exactly the tokens the
main player is trained on. A training sequence is `prompt_ids + response_ids`, where the
response ends with the template's end-of-turn token(s) and is the only part with loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_SENTINEL = "\u2063SPINRAYSENTINEL\u2063"


class ChatFormat:
    """Renders prompts with the model's chat template and finds its end-of-turn tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.end_of_turn_ids = self._find_end_of_turn()

    def _find_end_of_turn(self) -> list[int]:
        # Render a conversation whose answer is a sentinel: what the template writes after it,
        # minus trailing whitespace, closes an assistant turn (<|im_end|> for ChatML, <|eot_id|> for Llama 3).
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
        tail = rendered.split(_SENTINEL, 1)[1].rstrip()
        ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        if not ids:
            ids = [self.tokenizer.eos_token_id]
        return list(ids)

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end generation: the end-of-turn token(s) and eos."""
        stops = {self.end_of_turn_ids[-1]}
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        return sorted(stops)

    def prompt_text(self, messages: Sequence[dict]) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        return self.tokenizer(self.prompt_text(messages), add_special_tokens=False)["input_ids"]

    def batch_prompt_ids(self, prompts: Sequence[Sequence[dict]]) -> list[list[int]]:
        texts = [self.prompt_text(m) for m in prompts]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def batch_response_ids(self, responses: Sequence[str]) -> list[list[int]]:
        """Response tokens, tokenized alone, followed by the end-of-turn token(s): the model learns to stop. Training
        data goes through `in_context_response_ids` instead."""
        encoded = self.tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        return [ids + self.end_of_turn_ids for ids in encoded]

    def in_context_response_ids(self, prompts: Sequence[Sequence[dict]],
                                responses: Sequence[str]) -> tuple[list[list[int]], list[list[int]], int]:
        """(prompt ids, response ids, responses tokenized alone): each response tokenized as it follows its templated
        prompt, then the end-of-turn token(s).

        An engine's answer is ids produced after the prompt's; a human answer tokenized alone can start otherwise.
        SentencePiece-style tokenizers (Llama-2, Mistral, Zephyr) add a word-start marker to a text's first word:
        "There" alone is '▁There', after "<|assistant|>\n" it is 'T', 'he', 're', and self-play could learn to tell
        the human answers by their first token. So prompt + response is tokenized as one text and split where the
        prompt's own ids end. Where the prompt's ids are not a prefix of the joint ones (the two merge across the
        boundary) the response is tokenized alone, and counted.
        """
        texts = [self.prompt_text(m) for m in prompts]
        prompt_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        joined = [text + response for text, response in zip(texts, responses, strict=True)]
        joint = self.tokenizer(joined, add_special_tokens=False)["input_ids"]
        response_ids, alone = [], []
        for index, (prompt, both) in enumerate(zip(prompt_ids, joint, strict=True)):
            if both[:len(prompt)] == prompt:
                response_ids.append(both[len(prompt):] + self.end_of_turn_ids)
            else:
                response_ids.append(None)
                alone.append(index)
        if alone:
            for index, ids in zip(alone, self.batch_response_ids([responses[i] for i in alone]), strict=True):
                response_ids[index] = ids
        return prompt_ids, response_ids, len(alone)


@dataclass
class LengthReport:
    """What the over-length policy did, and the token-length distribution of what was kept."""

    pairs: int = 0
    kept: int = 0
    prompts_overlong: int = 0
    responses_overlong: int = 0
    dropped: int = 0
    truncated: int = 0
    prompt_tokens: dict | None = None
    response_tokens: dict | None = None


def length_stats(lengths: Sequence[int]) -> dict:
    if not lengths:
        return {"count": 0}
    array = np.asarray(lengths)
    return {
        "count": int(array.size),
        "mean": round(float(array.mean()), 1),
        "p50": int(np.percentile(array, 50)),
        "p95": int(np.percentile(array, 95)),
        "max": int(array.max()),
        "total": int(array.sum()),
    }


def apply_length_policy(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    max_prompt_tokens: int,
    max_response_tokens: int,
    policy: str,
) -> tuple[list[int], list[list[int]], list[list[int]], LengthReport]:
    """Apply the documented over-length policy to aligned prompt/response token lists.

    drop:     a pair whose prompt or response is too long is removed (counted).
    truncate: a long prompt keeps its last max_prompt_tokens tokens (the question's end and
              the assistant header survive); a long response keeps its first
              max_response_tokens tokens (it then has no end-of-turn token).
    Returns the kept indices, the (possibly truncated) token lists, and a report.
    """
    if policy not in ("drop", "truncate"):
        raise ValueError(f"unknown over-length policy {policy!r}")
    report = LengthReport(pairs=len(prompt_ids))
    kept, kept_prompts, kept_responses = [], [], []
    for index, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        long_prompt = len(prompt) > max_prompt_tokens
        long_response = len(response) > max_response_tokens
        report.prompts_overlong += long_prompt
        report.responses_overlong += long_response
        if long_prompt or long_response:
            if policy == "drop":
                report.dropped += 1
                continue
            report.truncated += 1
            prompt = prompt[-max_prompt_tokens:]
            response = response[:max_response_tokens]
        kept.append(index)
        kept_prompts.append(prompt)
        kept_responses.append(response)
    report.kept = len(kept)
    report.prompt_tokens = length_stats([len(p) for p in kept_prompts])
    report.response_tokens = length_stats([len(r) for r in kept_responses])
    return kept, kept_prompts, kept_responses, report
