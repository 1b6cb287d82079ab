"""dgl_fast: fast Decoupled Greedy Learning (Belilovsky, Eickenberg, Oyallon, ICML 2020) for PyTorch."""

from . import balancing, distributed, memory, models, ops, reference
from ._native import build_config
from .balancing import balance
from .buffer import ReplayBuffer, Sample
from .heads import HEAD_KINDS, AuxHead, LogitsHead
from .isolation import IsolationError, IsolationReport, check_isolation
from .model import DecoupledModel
from .schedules.capture_safety import CaptureUnsafeError
from .trainer import StepOutput, Trainer
from .utils import cpu_features

__version__ = "0.1.0"
__all__ = ["AuxHead", "CaptureUnsafeError", "DecoupledModel", "HEAD_KINDS", "IsolationError", "IsolationReport",
           "LogitsHead", "ReplayBuffer", "Sample", "StepOutput", "Trainer", "check_isolation",
           "build_config", "cpu_features", "balance", "balancing", "distributed", "memory", "models", "ops", "reference",
           "__version__"]
