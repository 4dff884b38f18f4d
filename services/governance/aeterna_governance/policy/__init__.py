"""Policies and rules: the model, validation at write time, resolution down the org tree,
checks and drift (no gRPC, no SQL)."""
