"""Change detection against a memory of earlier clear observations of a place."""
