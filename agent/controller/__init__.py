"""The cluster-level half: acting on the health labels the agents set (drain, reboot, replace)."""
