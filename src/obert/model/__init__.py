"""What obert does to a model: the prunable layers (targets), their masks, and loading models
and tokenizers safely."""
