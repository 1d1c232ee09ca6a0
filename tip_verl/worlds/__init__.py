"""Worlds that verl's own trainer runs on in CPU mode: models, data and rewards built here, nothing downloaded.

- :mod:`tip_verl.worlds.tiny`: a tiny addition task with random-init models, the smoke test of
  ``examples/run_tiny_cpu.sh`` (``python -m tip_verl.worlds.tiny --out DIR``);
- :mod:`tip_verl.worlds.demo`: a task of the local demo (``tip-verl demo``) exported to verl with its trained
  models, for ``examples/run_demo_world_cpu.sh`` (``python -m tip_verl.worlds.demo --task T --out DIR``);
- :mod:`tip_verl.worlds.reward`: their rule-based rewards (verl ``custom_reward_function``).

The CPU runtime that runs verl on them is :mod:`tip_verl.cpu`.
"""
