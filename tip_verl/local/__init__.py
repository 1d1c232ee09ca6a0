"""An embedded CPU world for TIP: synthetic tasks, a tiny teacher and student, and an on-policy loop.

tasks       verifiable tasks behind a registry (prompt, response, checker)
tokenizer   the character-level tokenizer shared by every task
models      Llama configs of teacher and student, save and load
pretrain    supervised training of the teacher and warm start of the student, cached
rollout     batched sampling with HF generate, masks, per-token log-probs and entropy
loop        the on-policy loop (GRPO or TIP-OPD through verl's estimator and policy loss)
"""
