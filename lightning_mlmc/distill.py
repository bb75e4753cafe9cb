"""``DistillModule``: knowledge distillation (Hinton et al. 2015) of a trained eps-network into a smaller one.

A frozen teacher ``ScoreModel`` (an exported folder or a ``ScoreModule`` checkpoint) and a student network built
like ``ScoreModule``'s (``channels``, ``layers_per_block``, ``attention``). The student regresses the teacher's
eps prediction at the inputs the teacher was trained on: x0 and y from the datamodule's batches (its operator, the
teacher's), t ~ U[t_min, 1] and x_t = m(t) x0 + sigma(t) eps drawn by the same function as the teacher's training
(``module.diffuse``, the teacher's schedule). The per-sample loss is

    |eps_student(x_t, y, t) - eps_teacher(x_t, y, t)|^2 (mean over pixels) + dsm_weight |eps_student - eps|^2,

reduced and logged by ``ScoreModule``: ``train/loss``, ``val/loss``, and beside them ``{stage}/eps_mismatch``
(the first term), ``{stage}/dsm`` (the student's denoising loss) and ``val/teacher_dsm``. Everything else is a
``ScoreModule``'s: optimizer, EMA through the callback, ``save_hyperparameters``, checkpoints, ``forward`` (the
student). The teacher is not a submodule: its weights stay out of the checkpoint, the optimizer and the EMA.

At the end of training (after the EMA callback has copied the average in) the student is exported in the
teacher's format to ``export_dir`` (default ``<default_root_dir>/export``), so ``load_score_model(export_dir)``
gives a model usable wherever the teacher is. Its ``lightning_mlmc.json`` also records ``flops_per_row`` and
``parameters`` of the student and, under ``distilled_from``, the teacher's path, weights hash, FLOPs per row and
parameters (FLOPs of one network call on one row, ``torch.utils.flop_counter``).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_mlmc.errors import InputError
from lightning_mlmc.module import ScoreModel, ScoreModule, diffuse, load_score_model
from lightning_mlmc.operators import operator_from_config

STUDENT_KEY = "model.network."  # where a ScoreModule / DistillModule checkpoint keeps the network's weights


def flops_per_row(model: ScoreModel) -> int:
    """FLOPs of one call of ``model`` on one row (``torch.utils.flop_counter.FlopCounterMode``; a
    multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.network.parameters())
    op = model.operator
    x = torch.zeros(1, *op.shape, dtype=param.dtype, device=param.device)
    y = torch.zeros(1, *op.observation_shape, dtype=param.dtype, device=param.device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, y, torch.full((1,), 0.5, dtype=param.dtype, device=param.device))
    return int(counter.get_total_flops())


def parameter_count(model: ScoreModel) -> int:
    return sum(p.numel() for p in model.network.parameters())


def weights_sha256(network: nn.Module) -> str:
    """A hash of a network's weights (names, shapes and float32 values), naming the teacher in the export."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_teacher(path: str, allow_pickle: bool = False) -> ScoreModel:
    """The frozen teacher from an exported folder or a ``ScoreModule`` checkpoint (``load_score_model``)."""
    if not path or not os.path.exists(path):
        raise InputError(f"model.teacher: no such file or folder {path!r} (expected the teacher's exported model "
                         "folder or its Lightning checkpoint)")
    try:
        teacher = load_score_model(path, allow_pickle=allow_pickle)
    except InputError as e:
        raise InputError(f"model.teacher: {str(e).removeprefix('checkpoint: ')}") from None
    if not isinstance(teacher, ScoreModel):
        raise InputError(f"model.teacher: {path!r} is an unconditional diffusers model; distillation needs a "
                         "lightning-mlmc model (an exported folder or a ScoreModule checkpoint)")
    teacher.eval().requires_grad_(False)
    return teacher


def student_weights(path: str, operator: dict, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The network weights of an exported folder or of a ``ScoreModule``/``DistillModule`` checkpoint, for
    initialising a student; its operator must be ``operator``."""
    if not os.path.exists(path):
        raise InputError(f"model.student_init: no such file or folder {path!r}")
    if os.path.isdir(path):
        model = load_score_model(path)
        found, weights = model.operator.config(), model.network.state_dict()
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except Exception as e:  # noqa: BLE001 - any failure means an unreadable file
            raise InputError(f"model.student_init: cannot read {path!r} ({type(e).__name__})") from None
        state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
        weights = {k.removeprefix(STUDENT_KEY): v for k, v in state.items() if k.startswith(STUDENT_KEY)}
        if not weights:
            raise InputError(f"model.student_init: {path!r} is not a lightning-mlmc checkpoint (no {STUDENT_KEY}*)")
        found = ckpt.get("hyper_parameters", {}).get("operator")
    if found != operator:
        raise InputError(f"model.student_init: {path!r} solves {found}, not the teacher's problem {operator}")
    return weights


class DistillModule(ScoreModule):
    """A student eps-network trained to match a frozen teacher's eps on the teacher's training distribution.

    Args:
        teacher: the teacher's exported model folder or ``ScoreModule`` checkpoint.
        operator: the data's operator config (LightningCLI links it from the datamodule); it must be the
            teacher's. None: the teacher's.
        network, channels, layers_per_block, attention, mlp_hidden, mlp_layers: the student, as in
            ``ScoreModule`` (network None: the teacher's kind).
        student_init: start the student from these weights (an exported folder or a checkpoint of the same
            architecture) instead of from scratch.
        dsm_weight: weight of the student's own denoising score-matching loss added to the eps mismatch (0.1
            gave the digits student a 17% smaller Var(P_teacher - P_student) of x^2 than 0 at equal steps).
        lr, weight_decay, warmup_steps: AdamW with a linear warm-up, as ``ScoreModule``.
        t_min: smallest training time, as the teacher was trained (ScoreModule's default).
        export_dir: where the student is exported at the end of training (None: ``<default_root_dir>/export``).
        allow_pickle: let a teacher checkpoint hold Python objects (see ``load_score_module``).
    """

    def __init__(
        self,
        teacher: str,
        operator: dict | None = None,
        network: Literal["unet", "mlp"] | None = None,
        channels: list[int] = [16, 16],  # noqa: B006 - jsonargparse-visible default
        layers_per_block: int = 1,
        attention: bool = False,
        mlp_hidden: int = 64,
        mlp_layers: int = 2,
        student_init: str | None = None,
        dsm_weight: float = 0.1,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        t_min: float = 1e-3,
        export_dir: str | None = None,
        allow_pickle: bool = False,
    ):
        teacher_model = load_teacher(teacher, allow_pickle)
        expected = teacher_model.operator.config()
        if operator is not None and operator_from_config(operator).config() != expected:
            raise InputError(f"model.operator: the data's operator {operator_from_config(operator).config()} is not "
                             f"the teacher's {expected}; a student learns the teacher's problem (use its data config)")
        if not (dsm_weight >= 0 and dsm_weight < float("inf")):
            raise InputError(f"model.dsm_weight: expected a finite number >= 0, got {dsm_weight}")
        # Resolved here, so that save_hyperparameters records what the student was built with.
        operator, network = expected, network or teacher_model.kind
        schedule = teacher_model.schedule
        super().__init__(operator=operator, network=network, channels=channels, layers_per_block=layers_per_block,
                         attention=attention, mlp_hidden=mlp_hidden, mlp_layers=mlp_layers, lr=lr,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, t_min=t_min,
                         beta_min=schedule.beta_min, beta_max=schedule.beta_max)
        # Not registered as a submodule (object.__setattr__): kept out of state_dict, optimizer and EMA.
        object.__setattr__(self, "teacher_model", teacher_model)
        if student_init:
            weights = student_weights(student_init, expected, allow_pickle)
            try:
                self.model.network.load_state_dict(weights)
            except RuntimeError as e:
                raise InputError(f"model.student_init: {student_init!r} does not fit the student's architecture "
                                 f"(channels {channels}, attention {attention}): {str(e).splitlines()[0]}") from None

    def teacher_eps(self, x_t: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """The frozen teacher's eps prediction (no gradient), on x_t's device."""
        teacher = self.teacher_model
        if next(teacher.parameters()).device != x_t.device:
            teacher.to(x_t.device)
        with torch.no_grad():
            return teacher(x_t, y, t)

    @override
    def losses(self, x0: Tensor, y: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Per-sample (B,) losses at one training draw (x_t, t, eps): ``eps_mismatch`` against the teacher,
        the student's ``dsm``, their weighted sum ``loss``, and on evaluation the teacher's ``teacher_dsm``."""
        x_t, t, eps = diffuse(x0, self.schedule, self.hparams.t_min, generator)
        student = self.model(x_t, y, t)
        teacher = self.teacher_eps(x_t, y, t)
        mismatch = (student - teacher).pow(2).flatten(1).mean(1)
        dsm = (student - eps).pow(2).flatten(1).mean(1)
        out = {"loss": mismatch + self.hparams.dsm_weight * dsm, "eps_mismatch": mismatch.detach(), "dsm": dsm.detach()}
        if not self.training:
            out["teacher_dsm"] = (teacher - eps).pow(2).flatten(1).mean(1)
        return out

    @override
    def on_train_start(self) -> None:
        self._train_started = time.perf_counter()

    @override
    def on_train_end(self) -> None:
        # Runs after the callbacks' on_train_end, so an EMA callback has copied the average in.
        self._train_seconds = time.perf_counter() - self._train_started
        if self.trainer.is_global_zero:
            folder = self.hparams.export_dir or os.path.join(self.trainer.default_root_dir, "export")
            self.export(folder)
            print(f"distill: exported the student to {folder}", flush=True)

    @override
    def export(self, folder: str) -> None:
        """The student in the teacher's export format, with its teacher and both FLOPs per row recorded."""
        teacher = self.teacher_model
        extra = {
            "flops_per_row": flops_per_row(self.model),
            "parameters": parameter_count(self.model),
            "distilled_from": {
                "teacher": os.path.abspath(self.hparams.teacher),
                "teacher_sha256": weights_sha256(teacher.network),
                "flops_per_row": flops_per_row(teacher),
                "parameters": parameter_count(teacher),
                "dsm_weight": self.hparams.dsm_weight,
                "t_min": self.hparams.t_min,
                "global_step": int(self.global_step),
                "train_seconds": getattr(self, "_train_seconds", None),  # this run's (a resumed run: since resuming)
            },
        }
        was_training = self.training
        self.eval()
        try:
            self.model.export(folder, extra)
        finally:
            self.train(was_training)
