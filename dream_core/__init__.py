"""DREAM Studio engine: DREAM (contrastive MAR encoder + text-conditioned FLUID decoder with a
diffusion head), Masking Warmup schedules, Semantically Aligned Decoding and reverse search."""

from .config import DreamConfig
from .model import DreamModel
from .pipeline import DreamOutput, DreamPipeline
from .request import GenerationRequest

__all__ = ["DreamConfig", "DreamModel", "DreamOutput", "DreamPipeline", "GenerationRequest"]
__version__ = "0.1.0"
