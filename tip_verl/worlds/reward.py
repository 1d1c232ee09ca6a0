"""Rule-based rewards for the CPU worlds (verl ``custom_reward_function``).

Use with ``reward.custom_reward_function.path=<this file>`` and ``reward.custom_reward_function.name=`` either
``compute_score`` (the tiny addition task of ``tip_verl.worlds.tiny``) or ``task_score`` (a task of the local
demo exported by ``tip_verl.worlds.demo``).
"""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 if the first word of the response is the correct sum, else 0.0."""
    words = solution_str.split()
    return 1.0 if words and words[0] == str(ground_truth) else 0.0


def task_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """The checker of a local demo task (`tip_verl.local.tasks`) on rows written by `tip_verl.worlds.demo`.

    extra_info["task"] names the task, extra_info["problem"] holds the problem's operands; the score is the
    task's own outcome reward, exactly what the local loop rewards.
    """
    from tip_verl.local.tasks import get_task

    if not extra_info or "task" not in extra_info or "problem" not in extra_info:
        raise ValueError(
            f"task_score needs extra_info with 'task' and 'problem' (rows of python -m tip_verl.worlds.demo); "
            f"got {extra_info!r} for data_source={data_source!r}. For other datasets set "
            "reward.custom_reward_function.name=compute_score or your own function."
        )
    problem = tuple(int(operand) for operand in extra_info["problem"])
    return get_task(extra_info["task"]).check(problem, solution_str)
