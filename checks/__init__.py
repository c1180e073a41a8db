"""Pluggable node health checks. Each check detects; the agent decides and reports."""
