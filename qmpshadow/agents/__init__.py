"""The long-running agents: the source agent (next to the primary) and the shadow agent."""
