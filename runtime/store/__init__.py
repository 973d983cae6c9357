"""Onboard state that outlives a pass: the reference store of what each place looked like."""
