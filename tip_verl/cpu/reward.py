"""Rule-based reward for the tiny addition task (verl ``custom_reward_function``).

Use with ``reward.custom_reward_function.path=<this file>`` and
``reward.custom_reward_function.name=compute_score``.
"""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 if the first word of the response is the correct sum, else 0.0."""
    words = solution_str.split()
    return 1.0 if words and words[0] == str(ground_truth) else 0.0
