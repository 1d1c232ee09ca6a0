"""tip-verl: token-importance on-policy distillation (TIP) mixed with GRPO, as a verl plugin.

Layers, bottom to top:
  tip_verl.core      pure tensor functions (scores, selection, advantages, losses), no verl import
  tip_verl.verl_ext  thin adapters that register the core with verl (estimator, trainer, losses)
  tip_verl.cpu       CPU mode for verl's own trainer (platform, vLLM CPU shims, /dev/shm cleanup)
  tip_verl.local     the CPU demo: its world (tasks, tiny models) and its training loop
  tip_verl.worlds    the tiny and demo worlds verl's own trainer runs on in CPU mode
  drivers            tip_verl.cli (the `tip-verl` command), launch scripts in examples/
"""

__version__ = "0.1.0"
