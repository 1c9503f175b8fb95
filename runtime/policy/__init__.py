"""Pure decision rules over expert ids and scores (no torch): substitution, eviction, host/transfer split.
The runtime executes them; the compiler's simulator replays traces through the same functions."""
