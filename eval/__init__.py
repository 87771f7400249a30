"""longctx evaluation: length-extrapolation sweeps (`python -m eval.extrapolation`) and passkey retrieval
(`python -m eval.passkey`) over the position-scheme variants of Su's tables (reference/methods.md §7)."""
