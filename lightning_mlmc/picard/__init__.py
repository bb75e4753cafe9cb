"""Picard-parallel sampling (DESIGN.md section 5): the sliding window (ParaDiGMS) with triangular Anderson
acceleration (ParaTAA), and the PIADM block scheme with its underdamped-Langevin corrector."""

from lightning_mlmc.picard.anderson import TriangularAnderson
from lightning_mlmc.picard.corrector import CorrectorPlan, corrector_rule
from lightning_mlmc.picard.piadm import ou_time, piadm_sample, piadm_times
from lightning_mlmc.picard.window import SlidingWindow, Trajectory, picard_sample, slide_stride
from lightning_mlmc.samplers import SLIDE_RULES

__all__ = ["SLIDE_RULES", "CorrectorPlan", "SlidingWindow", "Trajectory", "TriangularAnderson", "corrector_rule",
           "ou_time", "piadm_sample", "piadm_times", "picard_sample", "slide_stride"]
