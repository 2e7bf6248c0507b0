"""Tasks: the Task registry (metrics, headline, rows, answers, pictures per task kind) and the
task model (frozen LLM + method + modality encoder + head) with its inputs."""

from mmtune.tasks import kinds as _kinds  # noqa: F401  (registers the three tasks)
from mmtune.tasks.base import LOWER_IS_BETTER, Task, get_task, lower_is_better, register_task, tasks

__all__ = ["LOWER_IS_BETTER", "Task", "get_task", "lower_is_better", "register_task", "tasks"]
