"""tip-verl: token-importance on-policy distillation (TIP) mixed with GRPO, as a verl plugin.

Layers, bottom to top:
  tip_verl.core      pure tensor functions (scores, selection, advantages), no verl import
  tip_verl.verl_ext  thin adapters that register the core with verl (estimator, trainer, losses)
  drivers            CLI, the local loop, launch scripts in examples/
"""

__version__ = "0.1.0"
