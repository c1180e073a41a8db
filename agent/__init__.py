"""node-health-agent: finds bad GPU and Trainium nodes, takes them out of scheduling, says why."""

__version__ = "0.1.0"
