"""Chat-template tokenization: one format for generating and training, labels on the response only."""

import pytest
import torch

from spin_ray.data.tokenization import apply_length_policy
from spin_ray.objectives.logprobs import collate_sequences

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


ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


@pytest.fixture(scope="module")
def sentencepiece_style():
    """A Llama-2/Mistral-style tokenizer built here: BPE with byte fallback under a Metaspace pre-tokenizer that marks
    a text's first word ('▁There'), and Zephyr's chat template (the SPIN paper's model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from spin_ray.data.tokenization import ChatFormat

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="\u2581",
                                                                                    prepend_scheme="first")])
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    corpus = ["There are three apples and there is one pear.", "How many apples are there? There are some.",
              "Answer: There is a cat. The cat is here.", "Then there were five, and there they are."] * 50
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)])
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", additional_special_tokens=specials[3:])
    tokenizer.chat_template = ZEPHYR_TEMPLATE
    return ChatFormat(tokenizer)


def test_a_human_answer_gets_the_ids_it_has_after_its_prompt_not_a_word_start_marker(sentencepiece_style):
    chat = sentencepiece_style
    tokenizer = chat.tokenizer
    prompts = [[{"role": "user", "content": "How many apples are there?"}]] * 2
    answers = ["There are three apples.", "Then there were five."]
    prompt_ids, in_context, alone_count = chat.in_context_response_ids(prompts, answers)
    alone = chat.batch_response_ids(answers)
    assert alone_count == 0 and chat.end_of_turn_ids == [tokenizer.eos_token_id]
    assert tokenizer.convert_ids_to_tokens(alone[0][:1]) == ["\u2581There"]  # the cue this guards against
    for prompt, answer, text, by_itself in zip(prompt_ids, in_context, answers, alone, strict=True):
        # what a model emits after the prompt: the text continued in context (no word-start marker), then </s>
        joint = tokenizer(chat.prompt_text(prompts[0]) + text, add_special_tokens=False)["input_ids"]
        assert prompt + answer == joint + chat.end_of_turn_ids
        assert answer[0] != by_itself[0] and not tokenizer.convert_ids_to_tokens(answer[0]).startswith("\u2581")
        assert tokenizer.decode(prompt + answer[:-1]) == chat.prompt_text(prompts[0]) + text


def test_a_human_answer_equal_to_smollm2s_generated_text_gets_its_generated_ids(smollm2_path, chat):
    """SmolLM2's byte-level BPE: a greedy answer of the real model, decoded and read back as a human answer, gets the
    engine's ids (and tokenizing alone changes nothing for it, as for every GSM8K answer)."""
    from spin_ray.generation.hf_engine import HFEngine
    from spin_ray.models.resolution import load_model

    prompts = [[{"role": "user", "content": q}] for q in ("What is 12 + 30?", "Name a red fruit.",
                                                           "Say hello in French.")]
    engine = HFEngine(load_model(smollm2_path).eval(), chat, 24, batch_size=3)
    generated = engine.generate(chat.batch_prompt_ids(prompts))
    texts = [chat.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in generated]
    _, in_context, alone_count = chat.in_context_response_ids(prompts, texts)
    assert alone_count == 0
    for answer, g in zip(in_context, generated, strict=True):
        ids = list(g.token_ids)
        if g.finish_reason == "stop":  # the end-of-turn token the engine stopped on ends both
            assert answer == ids
        else:
            assert answer[:-len(chat.end_of_turn_ids)] == ids
    assert in_context == chat.batch_response_ids(texts)
