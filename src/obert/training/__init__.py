"""Training with pruning: the Trainer and its callback, distillation, schedules, recipes,
checkpoints, and the `obert finetune` / `obert prune` / `obert train` workflows."""
