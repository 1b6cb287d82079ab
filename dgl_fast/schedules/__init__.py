"""Schedules: in which order, on which streams, the stage steps run.

- :class:`SequentialSchedule` (``sequential.py``): every stage of a batch in turn (dgl, sequential
  greedy, backprop): the reference.
- :class:`PipelinedSchedule` (``pipelined.py``): stage j on batch t - j at tick t; in turn on the
  CPU, on one CUDA stream per stage, with a CUDA graph per stage step (its graph ticks:
  ``pipeline_graphs.py``).
- :class:`AsyncSchedule` (``asynchronous.py``): asynchronous DGL on replay buffers, in turn or
  free-running on streams, with a CUDA graph per stage step.

All follow :class:`Schedule` (``base.py``): ``feed``, ``flush``, ``read_metrics``, ``on_lr_change``,
``reset``, ``state_dict``. They get stage steps (:mod:`dgl_fast.stage`), buffers and streams,
never the trainer. ``graphs.py`` holds the capturable SGD step and the one capture routine; ``capture_safety.py`` the
watch that emulated graphs run under.
"""

from .asynchronous import SCHEDULES, AsyncSchedule
from .base import Metrics, Schedule, StageMetrics, StepOutput, stack_output
from .graphs import CaptureUnsafeError, CaptureWatch, EmulatedGraph, GraphSGD, capture
from .pipelined import PipelinedSchedule
from .sequential import SequentialSchedule

__all__ = ["Schedule", "StepOutput", "StageMetrics", "Metrics", "stack_output", "SequentialSchedule", "PipelinedSchedule",
           "AsyncSchedule", "SCHEDULES", "GraphSGD", "EmulatedGraph", "capture",
           "CaptureWatch", "CaptureUnsafeError"]
