"""The collapse watch: it fires on the history that collapsed and stays quiet on ordinary iterations."""

from spin_ray.run.collapse import collapse_signals

# bench/results/quality.json, the SPIN arm on 195 held-out GSM8K prompts: p1 fine, p2 collapsed
P0 = {"prompts": 195, "nll_per_token": 1.153168, "share_hit_max_new_tokens": 0.266667, "answer_format_rate": 0.487179}
P1 = {"prompts": 195, "nll_per_token": 1.081412, "share_hit_max_new_tokens": 0.282051, "answer_format_rate": 0.523077}
P2 = {"prompts": 195, "nll_per_token": 1.108481, "share_hit_max_new_tokens": 0.846154, "answer_format_rate": 0.112821}


def test_fires_on_the_iteration_that_collapsed_with_every_signal():
    signals = collapse_signals(P1, P2)
    assert set(signals) == {"nll", "length", "format"}
    assert signals["length"] == "answers hitting max_new_tokens rose 28% -> 85%"
    assert signals["format"] == "answer format rate fell 52% -> 11%"
    assert signals["nll"] == "human answers' NLL rose 1.0814 -> 1.1085 nats/token"


def test_quiet_on_an_improving_iteration_and_on_small_sample_noise():
    assert collapse_signals(P0, P1) == {}  # p1 improved NLL and format; +1.5 points of length-capped answers
    # the demo evaluates 16 prompts: one answer more at the limit (+6 points) is noise, not a signal
    demo_before = {"prompts": 16, "nll_per_token": 1.02, "share_hit_max_new_tokens": 0.25, "answer_format_rate": 0.5}
    demo_after = {
        "prompts": 16,
        "nll_per_token": 1.019,
        "share_hit_max_new_tokens": 0.3125,
        "answer_format_rate": 0.4375,
    }
    assert collapse_signals(demo_before, demo_after) == {}
    # but the same +6 points over 2,000 prompts is more than noise
    big = {**demo_after, "prompts": 2000}
    assert set(collapse_signals({**demo_before, "prompts": 2000}, big)) == {"length", "format"}


def test_tolerances_and_missing_metrics():
    assert collapse_signals(P1, P2, nll_tolerance=0.05).keys() == {"length", "format"}
    assert collapse_signals({"prompts": 195}, P2) == {}  # nothing to compare against


def test_the_validation_split_decides_when_both_models_have_it():
    on_validation = {f"validation_{k}": v for k, v in P1.items()}
    collapsed = {f"validation_{k}": v for k, v in P2.items()}
    # the held-out (test) numbers say nothing happened; the validation split says the model collapsed
    assert set(collapse_signals({**P1, **on_validation}, {**P1, **collapsed})) == {"nll", "length", "format"}
    assert collapse_signals({**P1, **on_validation}, {**P2, **on_validation}) == {}


def _validation(nll: float, share: float, formatted: float) -> dict:
    return {"validation_prompts": 60, "validation_nll_per_token": nll, "validation_share_hit_max_new_tokens": share,
            "validation_answer_format_rate": formatted}


# bench/results/quality-grid.json: SPIN at lr 2e-6 on 60 validation prompts, the same start p0
GRID_P0 = _validation(1.007738, 0.2, 0.733333)


def test_grid_histories_fire_where_answers_ran_long_and_stay_quiet_where_they_did_not():
    # nll_weight 0.2 alone: p1's answers run to the limit (20% -> 75%) and lose their format; p2's NLL rises
    nll_only = [GRID_P0, _validation(1.001665, 0.75, 0.233333), _validation(1.043548, 0.5, 0.366667)]
    assert set(collapse_signals(nll_only[0], nll_only[1])) == {"length", "format"}
    assert set(collapse_signals(nll_only[1], nll_only[2])) == {"nll"}
    # length_normalize + nll_weight 0.2: two iterations of lower NLL at p0's length and format
    normalized = [GRID_P0, _validation(0.965877, 0.216667, 0.783333), _validation(0.94753, 0.2, 0.8)]
    assert collapse_signals(normalized[0], normalized[1]) == {}
    assert collapse_signals(normalized[1], normalized[2]) == {}
