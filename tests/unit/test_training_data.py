"""Training examples: validation names the prompt_id and field; the (seed, epoch) schedule holds at any world size."""

import math

import numpy as np
import pytest

from spin_ray.config import load_config
from spin_ray.training.data import Schedule, TrainingDataError, examples_from_rows

SPIN = load_config()
SFT = load_config(overrides=["training.objective=sft"])
SPPO = load_config(overrides=["algorithm=sppo", "generation.num_samples=4", "generation.temperature=1"])
TSPIN_FREE = load_config(overrides=["algorithm=tspin", "tspin.reference_free=true"])
TSPIN_REF = load_config(overrides=["algorithm=tspin", "tspin.reference_free=false"])


def _row(i, **change):
    row = {"prompt_id": f"p{i:02d}", "prompt_token_ids": [1, 2], "real_token_ids": [3, 4], "generated_token_ids": [[5]],
           "ref_logp_real": -1.0, "ref_logp_generated": [-2.0]}
    row.update(change)
    return row


def test_pairs_are_validated_and_sorted_by_prompt_id():
    pairs = examples_from_rows([_row(3), _row(1), _row(2)], "x.parquet", SPIN)
    assert [p.prompt_id for p in pairs] == ["p01", "p02", "p03"]
    assert pairs[0].answers == ([3, 4], [5]) and pairs[0].ref_logps == (-1.0, -2.0)


@pytest.mark.parametrize(
    "change, field",
    [({"ref_logp_real": None}, "ref_logp_real"), ({"ref_logp_real": math.nan}, "ref_logp_real"),
     ({"ref_logp_generated": [math.inf]}, "ref_logp_generated"), ({"ref_logp_generated": []}, "ref_logp_generated"),
     ({"generated_token_ids": None}, "generated_token_ids"), ({"real_token_ids": []}, "real_token_ids")],
)
def test_bad_pairs_name_the_prompt_and_field(change, field):
    with pytest.raises(TrainingDataError, match=f"x.parquet, prompt_id p01, field '{field}'"):
        examples_from_rows([_row(0), _row(1, **change)], "x.parquet", SPIN)


def test_sft_needs_no_reference_and_empty_data_is_refused():
    (example,) = examples_from_rows([_row(0, ref_logp_real=None, generated_token_ids=None)], "d", SFT)
    assert example.answers == ([3, 4],) and example.ref_logps == ()
    with pytest.raises(TrainingDataError, match="empty"):
        examples_from_rows([], "d", SPIN)


def _sppo_row(rates, **change):
    row = _row(0, generated_token_ids=[[10], [11], [12], [13]], ref_logp_generated=[-1.0, -2.0, -3.0, -4.0],
               win_rates=rates, ref_logp_real=None)
    row.update(change)
    return row


def test_sppo_trains_on_the_winner_and_the_loser_by_win_rate():
    (example,) = examples_from_rows([_sppo_row([0.375, 0.625, 0.625, 0.375])], "d", SPPO)
    # first maximum (answer 1) and last minimum (answer 3), with their own reference log-probs
    assert example.answers == ([11], [13]) and example.ref_logps == (-2.0, -4.0)
    assert example.win_rates == (0.625, 0.375)
    # all answers tie: still two different answers, each with win rate 1/2 (targets 0)
    (tied,) = examples_from_rows([_sppo_row([0.5] * 4)], "d", SPPO)
    assert tied.answers == ([10], [13]) and tied.win_rates == (0.5, 0.5)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"win_rates": None}, "win_rates"),
        ({"win_rates": [0.5, math.nan, 0.5, 0.5]}, "win_rates"),
        ({"win_rates": [0.5, 1.5, 0.5, 0.5]}, "win_rates"),
        ({"ref_logp_generated": [-1.0, None, -3.0, -4.0]}, "ref_logp_generated"),
        ({"generated_token_ids": [[10]], "win_rates": [0.5]}, "generated_token_ids"),
    ],
)
def test_bad_sppo_rows_name_the_field(change, field):
    with pytest.raises(TrainingDataError, match=f"prompt_id p00, field '{field}'"):
        examples_from_rows([_sppo_row([0.25, 0.75, 0.5, 0.5], **change)], "d", SPPO)


def test_rows_checked_without_token_ids_validate_their_numbers():
    # what the driver does before training: no token ids are read, the numbers are still checked
    light = {
        key: value for key, value in _sppo_row([0.375, 0.625, 0.625, 0.375]).items() if not key.endswith("token_ids")
    }
    (example,) = examples_from_rows([light], "d", SPPO, with_tokens=False)
    assert example.answers == () and example.ref_logps == (-2.0, -4.0) and example.win_rates == (0.625, 0.375)
    with pytest.raises(TrainingDataError, match="field 'ref_logp_real': not finite"):
        examples_from_rows([{"prompt_id": "p", "ref_logp_real": math.nan, "ref_logp_generated": [-1.0]}], "d", SPIN,
                           with_tokens=False)


def test_tspin_triplets_with_and_without_reference():
    row = _row(0, proto_token_ids=[7, 8], ref_logp_real=None, ref_logp_generated=None)
    (free,) = examples_from_rows([row], "d", TSPIN_FREE)
    assert free.answers == ([3, 4], [5], [7, 8]) and free.ref_logps == ()
    assert free.tokens == 3 * 2 + 2 + 1 + 2
    with pytest.raises(TrainingDataError, match="field 'ref_logp_real': missing"):
        examples_from_rows([row], "d", TSPIN_REF)
    with_ref = {**row, "ref_logp_real": -1.0, "ref_logp_generated": [-2.0], "ref_logp_proto": -3.0}
    (example,) = examples_from_rows([with_ref], "d", TSPIN_REF)
    assert example.ref_logps == (-1.0, -2.0, -3.0)
    with pytest.raises(TrainingDataError, match="field 'proto_token_ids': missing"):
        examples_from_rows([_row(0)], "d", TSPIN_FREE)


def test_batch_larger_than_the_data_and_uneven_worlds_are_refused():
    with pytest.raises(TrainingDataError, match="larger than the data"):
        Schedule(num_pairs=3, global_batch_size=4, micro_batch_size=1, epochs=1, seed=0)
    with pytest.raises(TrainingDataError, match="multiple of workers x micro_batch_size"):
        Schedule(8, 4, 2, 1, 0).check_world(3)


def test_schedule_covers_each_pair_once_per_epoch_on_any_world_size():
    schedule = Schedule(num_pairs=10, global_batch_size=4, micro_batch_size=1, epochs=2, seed=7)
    assert schedule.steps_per_epoch == 2 and schedule.total_steps == 4
    for epoch in range(2):
        seen = np.concatenate([schedule.global_batch(epoch * 2 + s) for s in range(2)])
        assert len(set(seen.tolist())) == 8  # 2 of the 10 are left out this epoch, none doubled
    assert not np.array_equal(schedule.epoch_order(0), schedule.epoch_order(1))
    for step in range(4):
        one = np.concatenate(schedule.micro_batches(step, 0, 1))
        two = np.concatenate([np.concatenate(schedule.micro_batches(step, r, 2)) for r in range(2)])
        assert np.array_equal(one, two) and np.array_equal(one, schedule.global_batch(step))
    # a function of (seed, epoch)
    assert np.array_equal(Schedule(10, 4, 1, 2, 7).epoch_order(1), schedule.epoch_order(1))
