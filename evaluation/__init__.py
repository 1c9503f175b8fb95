"""moe-eval: the accuracy cost and the speed of each policy, on the same tokens, in one run."""
