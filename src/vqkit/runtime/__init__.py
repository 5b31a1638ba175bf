"""The runtime below every training job: the run loop (:mod:`.loop`), the learning-rate
schedules (:mod:`.schedule`), the deferred Ctrl-C (:mod:`.interrupt`), the batch drawn in
a thread (:mod:`.prefetch`), the log window (:mod:`.window`), the options every job has
and the resume policy (:mod:`.options`), and the job base (:mod:`.job`: process group,
run directory, resume, RNG, best.pt, closing barrier)."""

from .job import Job, LoaderJob
from .loop import Cadence, Progress, RunLoop, ScheduledOptimizer, StepResult
from .options import JobOptions, RunOptions
from .schedule import Schedule

__all__ = [
    "Cadence",
    "Job",
    "JobOptions",
    "LoaderJob",
    "Progress",
    "RunLoop",
    "RunOptions",
    "Schedule",
    "ScheduledOptimizer",
    "StepResult",
]
