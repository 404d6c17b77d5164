"""Chat-template tokenization: one format for generating and training, labels on the response only."""

import pytest
import torch

from spin_ray.tokenization import apply_length_policy, collate_sequences

MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


def test_end_of_turn_is_im_end_for_chatml(chat, tokenizer):
    assert chat.end_of_turn_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in chat.stop_token_ids


def test_training_sequence_equals_the_template_render(chat, tokenizer):
    """prompt_ids + response_ids is what the template writes for the whole conversation
    (minus the newline after the final end-of-turn), so training sees the generation prompt."""
    prompt = chat.prompt_ids(MESSAGES)
    response = chat.batch_response_ids(["4"])[0]
    full_text = tokenizer.apply_chat_template([*MESSAGES, {"role": "assistant", "content": "4"}], tokenize=False)
    full = tokenizer(full_text.rstrip("\n"), add_special_tokens=False)["input_ids"]
    assert prompt + response == full
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert response[-1] == chat.end_of_turn_ids[-1]


def test_batch_and_single_prompt_ids_agree(chat):
    prompts = [MESSAGES, [{"role": "user", "content": "A longer question about trains?"}]]
    assert chat.batch_prompt_ids(prompts) == [chat.prompt_ids(p) for p in prompts]


def test_drop_policy_counts_and_keeps_order():
    prompts = [[1] * 5, [1] * 20, [1] * 5, [1] * 5]
    responses = [[2] * 4, [2] * 4, [2] * 30, [2] * 4]
    kept, p, r, report = apply_length_policy(prompts, responses, 10, 10, "drop")
    assert kept == [0, 3]
    assert (report.prompts_overlong, report.responses_overlong, report.dropped, report.truncated) == (1, 1, 2, 0)
    assert report.kept == 2 and report.prompt_tokens["max"] == 5


def test_truncate_policy_keeps_prompt_end_and_response_start():
    prompts = [list(range(20))]
    responses = [list(range(100, 130))]
    kept, p, r, report = apply_length_policy(prompts, responses, 10, 8, "truncate")
    assert kept == [0]
    assert p[0] == list(range(10, 20))  # the end of the prompt (assistant header) survives
    assert r[0] == list(range(100, 108))
    assert report.truncated == 1 and report.dropped == 0
    with pytest.raises(ValueError):
        apply_length_policy(prompts, responses, 10, 8, "wrap")


def test_collate_masks_prompt_and_padding():
    batch = collate_sequences([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[False, False, False, True, True], [False, True, True, True, False]]
    assert batch["loss_mask"].dtype == torch.bool
