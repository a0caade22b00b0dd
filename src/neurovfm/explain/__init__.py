"""Explanations: where the model saw a finding (grounding maps on the original series)."""

# What a map shows. head: the head's per-class attention (where it looked); contribution: each
# token's positive share of the logit (what pushed the finding up; an exact decomposition for every
# head kind); token: each token's own probability of the finding from the head's token classifier
# (what a lesion-mask term trains directly; not for mean heads); rollout: the head's attention
# carried back through the encoder's layers; token-fused: the token map fused across the study's
# co-registered series (``explain.fusion``: a lesion shows on several sequences, a spurious peak on one).
MAP_SOURCES = ("head", "contribution", "token", "token-fused", "rollout")
TOKEN_MAPS = ("token", "token-fused")  # maps drawn from the head's token classifier
