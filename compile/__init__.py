"""Ground side: prune, quantise, export and bundle trained models for a target."""
