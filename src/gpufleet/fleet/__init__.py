"""Fleet runs: the run lock, rollouts and rollbacks, lost hosts."""
