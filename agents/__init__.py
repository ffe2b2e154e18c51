"""Agent handlers: the code that does a task for an agent."""

from agents.base import Handler, TaskContext, TaskFailed
from agents.registry import HandlerRegistry, default_registry

__all__ = ["Handler", "HandlerRegistry", "TaskContext", "TaskFailed", "default_registry"]
