"""icl-circuits: sparse feature circuits and task vectors for in-context learning, for any causal LM."""

from icl_circuits.core.loading import BUNDLED, load_model
from icl_circuits.core.model import LM, RunOutput
from icl_circuits.data.prompts import PromptBatch, PromptFormat, build_prompt, icl_prompts, zero_shot_prompts
from icl_circuits.core.sites import SITE_KINDS, Intervention, Site, add_at
from icl_circuits.data.tasks import PAPER_TASKS, Task, TaskFormatError, list_tasks, load_task, load_tasks

__version__ = "0.1.0"

__all__ = [
    "BUNDLED", "LM", "PAPER_TASKS", "SITE_KINDS", "Intervention", "PromptBatch", "PromptFormat",
    "RunOutput", "Site", "Task", "TaskFormatError", "add_at", "build_prompt", "icl_prompts",
    "list_tasks", "load_model", "load_task", "load_tasks", "zero_shot_prompts",
]  # fmt: skip
