"""MedDiffFT module logic: the scripting API, the parameter node, first-use dependencies, and the
non-blocking runs the widget starts (PythonSlicer subprocesses polled from a QTimer, so Slicer
stays responsive and a crash of the worker cannot take Slicer down)."""

from __future__ import annotations

import enum
import importlib.metadata
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from MedDiffFTSlicerLib import MRMLBridge
from MedDiffFTSlicerLib.CLIProcess import CLIProcess

REQUIREMENTS_PATH = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = ">=2.8"
POLL_INTERVAL_MS = 100


class Mode(enum.Enum):
    FINETUNE_AND_GENERATE = "both"
    GENERATE = "generate"
    FINETUNE = "finetune"

    def label(self) -> str:
        """Text of the mode in the UI (used by the parameter node's combo box connector)."""
        return {
            Mode.FINETUNE_AND_GENERATE: _("Fine-tune, then generate"),
            Mode.GENERATE: _("Generate with a model"),
            Mode.FINETUNE: _("Fine-tune a model"),
        }[self]


@parameterNodeWrapper
class MedDiffFTParameterNode:
    """Inputs and settings of one MedDiffFT run (defaults are the library's)."""

    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    segmentIds: list[str]  # synced by hand: there is no connector for qMRMLSegmentSelectorWidget
    allowedRegionSegmentId: str  # synced by hand, like segmentIds; empty: the body
    mode: Mode = Mode.FINETUNE_AND_GENERATE
    modelFolder: Path
    samples: Annotated[int, WithinRange(1, 64)] = 4
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    trainSteps: Annotated[int, WithinRange(1, 100000)] = 600
    samplingSteps: Annotated[int, WithinRange(1, 1000)] = 25
    resolution: Annotated[int, WithinRange(16, 1024)] = 64
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    backbone: Annotated[str, Choice(["compact", "sd-inpaint"])] = "compact"
    baseModel: str = ""
    guidanceScale: Annotated[float, WithinRange(1.0, 20.0)] = 3.0
    maskSource: Annotated[str, Choice(["generator", "jitter", "label"])] = "generator"
    oldLesion: Annotated[str, Choice(["heal", "keep", "cover"])] = "heal"
    placement: Annotated[str, Choice(["uniform", "learned"])] = "uniform"
    qa: bool = True
    erode: str = "auto"


def modelDirOf(parameters: MedDiffFTParameterNode) -> Path | None:
    """The chosen model folder, None when the path field is empty (it reads as ``.`` then)."""
    return None if str(parameters.modelFolder) in ("", ".") else parameters.modelFolder


class MedDiffFTLogic(ScriptedLoadableModuleLogic):
    """Scripts call ``generate`` / ``finetune`` (nodes in, nodes or model folder out, blocking;
    see ``MRMLBridge``); the widget calls ``start`` / ``cancel``. No dialogs except for the
    dependency installation the widget asks for."""

    generate = staticmethod(MRMLBridge.generate)
    finetune = staticmethod(MRMLBridge.finetune)

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._run: _JobRunner | None = None
        self._dependenciesReady = False

    def getParameterNode(self) -> MedDiffFTParameterNode:
        return MedDiffFTParameterNode(super().getParameterNode())

    @property
    def isRunning(self) -> bool:
        return self._run is not None

    def ensureDependencies(self) -> None:
        """Installs PyTorch and ``requirements.txt`` on first use (never at import time).

        Torch comes from the PyTorch extension, which picks the build matching the GPU driver, and
        must be installed before pip sees packages that would otherwise pull a PyPI torch.
        """
        if self._dependenciesReady:
            return
        try:
            import PyTorchUtils
        except ModuleNotFoundError as error:
            raise RuntimeError(
                _("MedDiffFT needs the PyTorch extension: install 'PyTorch' in the Extensions Manager, restart Slicer and try again.")
            ) from error
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled() and torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT) is None:
            raise RuntimeError(_("MedDiffFT needs PyTorch, which was not installed."))
        if hasattr(slicer, "packaging"):  # Slicer >= 5.12
            slicer.packaging.pip_ensure(slicer.packaging.load_requirements(REQUIREMENTS_PATH), requester="MedDiffFT")
        elif _missingDistributions(REQUIREMENTS_PATH):
            if not slicer.util.confirmOkCancelDisplay(_("MedDiffFT needs to install Python packages (diffusers, peft, monai, ...). Install them now?")):
                raise RuntimeError(_("MedDiffFT cannot run without its Python packages."))
            slicer.util.pip_install(["-r", str(REQUIREMENTS_PATH)])
        self._dependenciesReady = True

    def jobs(self, parameters: MedDiffFTParameterNode, overwriteModel: bool = False) -> list[MRMLBridge.Job]:
        """Exports the inputs and prepares the library commands the mode needs, in run order."""
        modelDir = modelDirOf(parameters)
        if modelDir is None and parameters.mode != Mode.FINETUNE_AND_GENERATE:
            raise ValueError(_("Choose a model folder: fine-tuning writes the model there and generating reads it."))
        volume, segmentation = parameters.inputVolume, parameters.inputSegmentation
        segmentIds = list(parameters.segmentIds) or None
        common = {"seed": parameters.seed, "device": parameters.device, "qa": "on" if parameters.qa else "off"}
        training = {**common, "train_steps": parameters.trainSteps, "resolution": parameters.resolution, "backbone": parameters.backbone}
        if parameters.backbone == "sd-inpaint":
            training["base_model"] = parameters.baseModel
        sampling = {
            **common,
            "samples": parameters.samples,
            "sampling_steps": parameters.samplingSteps,
            "guidance_scale": parameters.guidanceScale,
            "mask_source": parameters.maskSource,
            "old_lesion": parameters.oldLesion,
            "placement": parameters.placement,
            "erode": parameters.erode,
            "allowed_region": parameters.allowedRegionSegmentId or None,
        }  # fmt: skip
        jobs = []
        try:
            if modelDir is not None and parameters.mode != Mode.GENERATE:
                jobs.append(
                    MRMLBridge.prepareFinetune(
                        [volume], [segmentation], segmentIds, modelDir=modelDir, options={**training, "overwrite": overwriteModel}
                    )
                )
            if parameters.mode != Mode.FINETUNE:
                options = sampling if modelDir is not None else {**training, **sampling}
                jobs.append(MRMLBridge.prepareGenerate(volume, segmentation, segmentIds, modelDir=modelDir, options=options))
        except Exception:
            for job in jobs:
                job.discard()
            raise
        return jobs

    def start(
        self,
        parameters: MedDiffFTParameterNode,
        *,
        overwriteModel: bool = False,
        onProgress: Callable[[dict], None],
        onLog: Callable[[str], None],
        onFinished: Callable[[object, Exception | None], None],
    ) -> None:
        """Starts the run in PythonSlicer subprocesses and returns at once.

        ``onFinished(result, error)`` is called on the main thread at the end: ``result`` is a
        ``MRMLBridge.GenerateResult`` or the model folder; ``error`` is None, ``Cancelled`` or the
        failure.
        """
        if self.isRunning:
            raise RuntimeError(_("MedDiffFT is already running."))

        def finished(result, error):
            self._run = None
            onFinished(result, error)

        self._run = _JobRunner(self.jobs(parameters, overwriteModel), onProgress, onLog, finished)

    def cancel(self) -> None:
        """Asks the running command to stop; nothing is added to the scene."""
        if self._run is not None:
            self._run.cancel()


class _JobRunner:
    """Runs jobs one after another in PythonSlicer subprocesses, polled by a QTimer on the main
    thread, and loads each job's result there."""

    def __init__(self, jobs, onProgress, onLog, onFinished) -> None:
        self._jobs = list(jobs)
        self._onProgress, self._onLog, self._onFinished = onProgress, onLog, onFinished
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)
        try:
            self._process = self._startProcess()
        except Exception:
            self._discardJobs()
            raise
        self._timer.start()

    def _startProcess(self) -> CLIProcess:
        pythonSlicer = shutil.which("PythonSlicer")
        if pythonSlicer is None:
            raise RuntimeError(_("PythonSlicer was not found next to Slicer; reinstall Slicer."))
        job = self._jobs[0]
        return CLIProcess(job.arguments, job.workDir, python=pythonSlicer, onProgress=self._onProgress, onLog=self._onLog)

    def _poll(self) -> None:
        try:
            if not self._process.poll():
                return
            job = self._jobs.pop(0)
            try:
                result = job.load(self._process.result())
            finally:
                job.discard()
            if self._jobs:
                self._process = self._startProcess()
                return
        except Exception as error:  # reported to the widget, which shows it
            self._finish(None, error)
            return
        self._finish(result, None)

    def _finish(self, result, error) -> None:
        self._timer.stop()
        self._discardJobs()
        self._onFinished(result, error)

    def _discardJobs(self) -> None:
        for job in self._jobs:
            job.discard()
        self._jobs = []

    def cancel(self) -> None:
        self._process.cancel()


def _missingDistributions(requirementsPath: Path) -> list[str]:
    """Requirement names without an installed distribution (Slicer < 5.12 has no ``slicer.packaging``)."""
    names = [
        re.split(r"[<>=!~;\[\s]", line.strip(), maxsplit=1)[0]
        for line in requirementsPath.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "-"))
    ]
    missing = []
    for name in names:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing
