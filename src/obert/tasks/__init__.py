"""Tasks: text data loading, classification (models, evaluation) and extractive question
answering (features, post-processing, SQuAD metrics)."""
