"""Training data, trainers and training-time helpers."""
