"""The serve workload: a vLLM OpenAI-compatible server planned from the hardware, and a terminal chat."""

from llmops.serve.config import ServeConfig
from llmops.serve.server import ServerPlan, plan_server, run_server

__all__ = ["ServeConfig", "ServerPlan", "plan_server", "run_server"]
