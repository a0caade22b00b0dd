"""Explanations: where the model saw a finding (grounding maps on the original series)."""
