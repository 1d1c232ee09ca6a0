"""`actor/tip_loss/selected_fraction` is selected over response tokens of the mini-batch, through verl's own metric
reduction: per rank over micro-batches (`postprocess_batch_func`), over data-parallel ranks (`Metric.aggregate_dp`,
on what `allgather_dict_into_dict` gathers, as the actor worker's update_actor does) and over mini-batches (the
trainer's `reduce_metrics`).

Every rule keeps max(1, floor(ratio * m_i)) tokens of a response of m_i tokens; at ratio 0.5:
    rank 0: micro-batch [1, 3] -> 1 + 1 of 4, micro-batch [5] -> 2 of 5
    rank 1: micro-batch [2, 2] -> 1 + 1 of 4, micro-batch [7] -> 3 of 7
    mini-batch: (2 + 2 + 2 + 3) / (4 + 5 + 4 + 7) = 9 / 20 = 0.45
(the mean of the four micro-batch fractions, what was reported before, is 0.4571).
"""

from itertools import chain

import pytest
from loss_batches import micro_batch, tip_k3
from verl.utils import tensordict_utils as tu
from verl.utils.metric import Metric, reduce_metrics
from verl.utils.py_functional import append_to_dict
from verl.workers.engine.utils import postprocess_batch_func

TIP = {"rule": "random", "ratio": 0.5, "seed": 0}
KEY = "tip_loss/selected_fraction"


def rank_metrics(micro_batch_lengths, batch_num_tokens, dp_size):
    """One data-parallel rank's metrics of one mini-batch, collected over its micro-batches as verl's engine does."""
    outputs = []
    for lengths in micro_batch_lengths:
        data = micro_batch(lengths, TIP, dp_size=dp_size, batch_num_tokens=batch_num_tokens)
        _, metrics = tip_k3(data)
        outputs.append({"loss": 0.0, "metrics": metrics})
    mini_batch = tu.get_tensordict(tensor_dict={}, non_tensor_dict={"use_dynamic_bsz": False})
    return postprocess_batch_func(outputs, indices=None, data=mini_batch)["metrics"]


def step_value(mini_batches):
    """The step's value as verl computes it: each mini-batch reduced over the data-parallel ranks' gathered metrics
    in the actor worker (engine_workers.update_actor), the mini-batches then by the trainer (reduce_metrics)."""
    metrics = {}
    for ranks in mini_batches:
        tokens = sum(sum(lengths) for rank in ranks for lengths in rank)
        gathered = [rank_metrics(rank, tokens, dp_size=len(ranks))[KEY] for rank in ranks]
        if isinstance(gathered[0], Metric):
            value = Metric.aggregate_dp(gathered)
        else:
            value = list(chain.from_iterable(gathered))
        append_to_dict(metrics, {KEY: value})
    return reduce_metrics(metrics)[KEY]


def test_selected_over_response_tokens_of_the_mini_batch():
    assert step_value([[[[1, 3], [5]], [[2, 2], [7]]]]) == pytest.approx(9 / 20, abs=1e-12)


def test_one_rank_one_micro_batch():
    assert step_value([[[[1, 3, 5, 2, 2, 7]]]]) == pytest.approx(9 / 20, abs=1e-12)


def test_trainer_averages_mini_batches():
    # a second mini-batch, [6] on rank 0 and [9] on rank 1: (3 + 4) / 15
    assert step_value([[[[6]], [[9]]]]) == pytest.approx(7 / 15, abs=1e-12)
    two = step_value([[[[1, 3], [5]], [[2, 2], [7]]], [[[6]], [[9]]]])
    assert two == pytest.approx((9 / 20 + 7 / 15) / 2, abs=1e-12)
