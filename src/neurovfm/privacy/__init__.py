"""Patient privacy: keyed-hash identifiers, the metadata allowlist and the PHI audit."""
