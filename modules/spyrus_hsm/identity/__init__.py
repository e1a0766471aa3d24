"""Identities built on HSM keys: SAS tokens, DPS key derivation, X.509, TLS."""
