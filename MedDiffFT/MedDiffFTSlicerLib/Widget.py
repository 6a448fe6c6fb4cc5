"""MedDiffFT module widget: binds the UI to the parameter node and shows a run's progress, log and
result. All work goes through ``MedDiffFTLogic``."""

from __future__ import annotations

import contextlib
import importlib
import sys

import slicer
import vtk
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from MedDiffFTLib.errors import Cancelled
from MedDiffFTSlicerLib import MRMLBridge
from MedDiffFTSlicerLib.Logic import MedDiffFTLogic, MedDiffFTParameterNode, Mode, modelDirOf

RELOADED_PACKAGES = ("MedDiffFTLib", "MedDiffFTSlicerLib")


class MedDiffFTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: MedDiffFTLogic | None = None
        self._parameterNode: MedDiffFTParameterNode | None = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDiffFT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedDiffFTLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentSelectorChanged)
        self.ui.segmentSelector.connect("segmentSelectionChanged(QStringList)", self.onSegmentSelectorChanged)
        self.ui.allowedRegionSelector.connect("currentSegmentChanged(QString)", self.onSegmentSelectorChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.logic.cancel()
        self.removeObservers()
        self.setParameterNode(None)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onReload(self) -> None:
        """Re-imports MedDiffFTLib and MedDiffFTSlicerLib, then lets Slicer re-run MedDiffFT.py
        (which on its own reloads only itself). Modules are dropped and imported anew rather than
        reloaded one by one, so no module keeps a class from an older copy of another."""
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in RELOADED_PACKAGES)
        for name in loaded:
            del sys.modules[name]
        importlib.invalidate_caches()
        for name in loaded:
            importlib.import_module(name)
        super().onReload()

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancel()  # its input nodes are going away
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, parameterNode: MedDiffFTParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """Shows the segment selections of the parameter node and which actions are possible."""
        segmentSelector, regionSelector = self.ui.segmentSelector, self.ui.allowedRegionSelector
        wasBlocked = segmentSelector.blockSignals(True), regionSelector.blockSignals(True)
        segmentSelector.setCurrentNode(self._parameterNode.inputSegmentation)
        segmentSelector.setSelectedSegmentIDs(list(self._parameterNode.segmentIds))
        regionSelector.setCurrentNode(self._parameterNode.inputSegmentation)  # a segment of the same segmentation
        regionSelector.setCurrentSegmentID(self._parameterNode.allowedRegionSegmentId)
        segmentSelector.blockSignals(wasBlocked[0])
        regionSelector.blockSignals(wasBlocked[1])
        self.ui.baseModelLineEdit.enabled = self.ui.guidanceScaleSpinBox.enabled = self._parameterNode.backbone == "sd-inpaint"
        self.updateApplyButton()

    def onSegmentSelectorChanged(self, *unused) -> None:
        if self._parameterNode is None:
            return
        segmentation = self.ui.segmentSelector.currentNode()
        segmentIds = list(self.ui.segmentSelector.selectedSegmentIDs())
        with slicer.util.NodeModify(self._parameterNode):
            self._parameterNode.inputSegmentation = segmentation
            self._parameterNode.segmentIds = segmentIds
            self._parameterNode.allowedRegionSegmentId = self.ui.allowedRegionSelector.currentSegmentID() or ""

    def updateApplyButton(self) -> None:
        """Apply while idle (enabled once the inputs are complete), Cancel while running."""
        button = self.ui.applyButton
        if self.logic.isRunning:
            button.text, button.toolTip, button.enabled = _("Cancel"), _("Stop the run; nothing is added to the scene."), True
            return
        missing = self._missingInput()
        button.text, button.toolTip, button.enabled = _("Apply"), missing or _("Run MedDiffFT."), not missing

    def _missingInput(self) -> str:
        """What must still be chosen before a run can start, or an empty string."""
        parameters = self._parameterNode
        if parameters is None or not parameters.inputVolume:
            return _("Select an input volume.")
        if not parameters.inputSegmentation:
            return _("Select a segmentation.")
        if parameters.mode != Mode.FINETUNE_AND_GENERATE and modelDirOf(parameters) is None:
            return _("Choose a model folder.")
        if parameters.mode != Mode.GENERATE and parameters.backbone == "sd-inpaint" and not parameters.baseModel:
            return _("Give the base model (a folder or hub id) to fine-tune.")
        if parameters.allowedRegionSegmentId in parameters.segmentIds:
            return _("The allowed region cannot also be a segment to synthesize.")
        return ""

    def onApplyButton(self) -> None:
        if self.logic.isRunning:
            self.logic.cancel()
            self.ui.applyButton.enabled = False
            self.onLog(_("Cancelling..."))
            return
        with slicer.util.tryWithErrorDisplay(_("MedDiffFT could not start."), waitCursor=True):
            self.logic.ensureDependencies()
            overwriteModel = self._modelFolderMayBeReplaced()
            if overwriteModel is None:
                return
            self.ui.logTextEdit.clear()
            self.ui.progressBar.setValue(0)
            self.logic.start(
                self._parameterNode,
                overwriteModel=overwriteModel,
                onProgress=self.onProgress,
                onLog=self.onLog,
                onFinished=self.onFinished,
            )
            self.onLog(_("Started; Slicer stays usable while MedDiffFT runs."))
        self.updateApplyButton()

    def _modelFolderMayBeReplaced(self) -> bool | None:
        """Whether fine-tuning may replace a non-empty model folder: False when there is nothing to
        replace, None when the user declined."""
        modelDir = modelDirOf(self._parameterNode)
        finetunes = self._parameterNode.mode != Mode.GENERATE
        if not finetunes or modelDir is None or not modelDir.is_dir() or not any(modelDir.iterdir()):
            return False
        question = _("The model folder {folder} is not empty. Replace its contents with the new model?").format(folder=modelDir)
        return True if slicer.util.confirmOkCancelDisplay(question) else None

    def onProgress(self, event: dict) -> None:
        self.ui.progressBar.maximum = event["total"]
        self.ui.progressBar.value = event["step"]
        self.ui.progressBar.format = f"{event['stage']}: %v / %m"

    def onLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    def onFinished(self, result, error: Exception | None) -> None:
        self.updateApplyButton()
        if isinstance(error, Cancelled):
            self.onLog(_("Cancelled: nothing was added to the scene."))
            return
        # the same error display as for Apply, without raising out of a Qt slot
        with contextlib.suppress(Exception), slicer.util.tryWithErrorDisplay(_("MedDiffFT failed.")):
            if error is not None:
                raise error
            if isinstance(result, MRMLBridge.GenerateResult):
                shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
                message = _("Added {count} synthetic volumes with segmentations in folder '{folder}'.")
                self.onLog(message.format(count=len(result.volumes), folder=shNode.GetItemName(result.folderItemId)))
                slicer.util.setSliceViewerLayers(background=result.volumes[0], fit=True)
            else:
                self.onLog(_("Model written to {folder}.").format(folder=result))
