"""SPIN's stabilised losses against TRL's DPOTrainer on the same batch: RPO's NLL term and length-normalised ratios."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl): the parity check needs its DPOTrainer")

from spin_ray.objectives.logprobs import sequence_logps  # noqa: E402
from spin_ray.objectives.losses import spin_loss  # noqa: E402

PAIRS = {"prompt": ["Tom has 3 apples and buys 4 more. How many apples?", "What is 12 divided by 4?"],
         "chosen": [" He has 3 + 4 = 7 apples.\n#### 7", " 12 / 4 = 3\n#### 3"],
         "rejected": [" Tom has many apples, more than before, and he keeps them all", " It is 4"]}


def _trainer(tiny_model_dir, tmp_path, loss_type: list[str], loss_weights: list[float]):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # a policy that differs from its reference: log-ratios away from zero
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=loss_type, loss_weights=loss_weights,
                         per_device_train_batch_size=1, report_to=[], use_cpu=True, seed=0)
    return trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_dict(PAIRS),
                          processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))


def _ours(trainer, batch: dict, **options) -> torch.Tensor:
    """spin_loss on the pair TRL collated: chosen = the human answer, rejected = the opponent's."""
    ids, mask = batch["input_ids"], batch["completion_mask"].bool()
    with torch.no_grad():
        policy = sequence_logps(trainer.model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, ids, mask)
        reference = sequence_logps(trainer.ref_model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, ids,
                                   mask)
    tokens = mask[:, 1:].sum(-1).float()
    losses, _ = spin_loss(policy[:1], policy[1:], reference[:1], reference[1:], beta=0.1, real_tokens=tokens[:1],
                          generated_tokens=tokens[1:], **options)
    return losses.mean()


@pytest.mark.parametrize(("trl_losses", "ours"), [
    ((["sigmoid", "sft"], [1.0, 0.5]), {"nll_weight": 0.5}),  # RPO: TRL's sigmoid + alpha x sft
    ((["sigmoid_norm"], [1.0]), {"length_normalize": True}),  # LN-DPO
], ids=["rpo", "length-normalized"])
def test_spin_loss_equals_trl_dpo_trainer(tiny_model_dir, tmp_path, trl_losses, ours):
    trainer = _trainer(tiny_model_dir, tmp_path, *trl_losses)
    trainer.model.eval()
    checked = 0
    for batch in trainer.get_train_dataloader():  # one pair per batch: TRL's token-mean NLL is then the pair's
        with torch.no_grad():
            theirs = trainer.compute_loss(trainer.model, batch)
        mine = _ours(trainer, batch, **ours)
        assert mine.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
        assert abs(mine.item() - 0.6931) > 1e-3  # not the trivial log 2 of equal models
        checked += 1
    assert checked == len(PAIRS["prompt"])
