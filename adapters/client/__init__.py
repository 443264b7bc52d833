"""Python clients for agentserve's native gRPC API (see client.py)."""

from agentserve.adapters.client.client import AgentClient, Session, TurnOutcome

__all__ = ["AgentClient", "Session", "TurnOutcome"]
