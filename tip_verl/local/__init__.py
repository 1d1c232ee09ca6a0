"""The CPU demo (`tip-verl demo`): synthetic tasks, a tiny teacher and student, and an on-policy loop that runs
verl's own estimator and policy loss without verl's trainer. verl's trainer runs the same world through
`tip_verl.worlds.demo`.

tasks        verifiable tasks behind a registry (prompt, reference response, checker)
tokenizer    the character-level tokenizer every task uses
models       Llama configs of teacher and student, save and load
pretrain     supervised training of the teacher and warm start of the student
assets       where the models come from: user cache, shipped checkpoints, or training
rollout      batched sampling with HF generate, masks, per-token log-probs and entropy
evaluate     greedy held-out accuracy; reference responses as a batch
loop         the on-policy loop (GRPO or TIP-OPD through verl's estimator and policy loss)
checkpoint, interrupt, timing, memory   run state, Ctrl-C, per-phase seconds, activation memory
plots, report                           PNG plots and the final table of a run
"""
