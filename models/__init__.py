"""The model zoo: architectures, training scripts, model cards and trained weights."""
