"""Qt-free bridge between MRML nodes and MedDiffFTLib.

Exports the input nodes to a temporary folder (volume NRRD + labelmap NRRD on the volume's grid),
builds the library's command line, and loads the command's outputs back as new nodes with exactly
the input's IJK-to-RAS matrix. Only ``slicer`` core classes are used and the scene always comes from
the given nodes (never ``slicer.mrmlScene``), so the same code runs in Slicer, in PythonSlicer and
under slicer-core in tests. Input nodes are never modified; nodes are added to the scene only once
every output has been read and converted, so a failure or a cancel adds nothing.

Scripts call ``generate`` / ``finetune`` (in-process, blocking). The module's logic calls
``prepareGenerate`` / ``prepareFinetune`` and runs the returned job's arguments in a PythonSlicer
subprocess instead, then calls ``job.load``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import slicer
import vtk

ATTRIBUTE_PREFIX = "MedDiffFT."
SOURCE_VOLUME_REFERENCE_ROLE = "MedDiffFTSourceVolume"
ARGUMENTS_SET_FROM_NODES = frozenset({"image", "label", "out", "model", "model_out"})
GEOMETRY_TOLERANCE_MM = 1e-4


@dataclass
class GenerateResult:
    """Nodes added by one ``generate`` run, all inside one subject-hierarchy folder."""

    volumes: list
    segmentations: list
    folderItemId: int
    runId: str


class Job:
    """One library command prepared from scene nodes.

    ``arguments`` is the CLI command line without the program name; ``workDir`` holds the exported
    inputs and the outputs; ``load(doneEvent)`` turns the command's final ``done`` event into the
    result (new nodes, or the model folder).
    """

    def __init__(self, arguments: list[str], workDir: Path, load: Callable[[dict], object]) -> None:
        self.arguments = arguments
        self.workDir = workDir
        self.load = load

    def run(self, progress: Callable[[dict], None] | None = None, cancel: Callable[[], bool] | None = None):
        """Runs the command in this process (blocking), loads its result and removes the work folder."""
        from MedDiffFTLib.cli import run_command  # imports torch: only once work is requested

        try:
            return self.load(run_command(self.arguments, on_progress=progress, should_cancel=cancel))
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.workDir, ignore_errors=True)


def generate(
    volumeNode,
    segmentationNode,
    segmentIds: Sequence[str] | None = None,
    *,
    modelDir: str | Path | None = None,
    options: dict | None = None,
    outputFolderName: str | None = None,
    progress: Callable[[dict], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> GenerateResult:
    """Synthesizes new image + segmentation pairs from a volume and its segments (blocking).

    Without ``modelDir`` the model is first fine-tuned on this case (the library's ``run``); with
    it, that model only samples. ``segmentIds`` (default: all segments) guide the synthesis;
    ``options`` are library CLI options with underscores (``{"samples": 4, "seed": 0}``).
    ``progress`` receives the library's event dicts; ``cancel`` returning True stops the run
    (``MedDiffFTLib.errors.Cancelled``). Returns the new nodes, placed in one folder next to the
    input volume.
    """
    job = prepareGenerate(
        volumeNode, segmentationNode, segmentIds, modelDir=modelDir, options=options, outputFolderName=outputFolderName
    )
    return job.run(progress, cancel)


def finetune(
    volumeNodes: Sequence,
    segmentationNodes: Sequence,
    segmentIds: Sequence[str] | None = None,
    *,
    modelDir: str | Path,
    options: dict | None = None,
    progress: Callable[[dict], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Path:
    """Fine-tunes a model on one or more volumes with their segmentations (blocking).

    ``volumeNodes[i]`` is paired with ``segmentationNodes[i]``; ``segmentIds`` (default: all
    segments) are looked up in every segmentation. Returns the model folder (``modelDir``), which
    ``generate(modelDir=...)`` uses.
    """
    job = prepareFinetune(volumeNodes, segmentationNodes, segmentIds, modelDir=modelDir, options=options)
    return job.run(progress, cancel)


def prepareGenerate(
    volumeNode,
    segmentationNode,
    segmentIds: Sequence[str] | None = None,
    *,
    modelDir: str | Path | None = None,
    options: dict | None = None,
    outputFolderName: str | None = None,
) -> Job:
    """Exports the inputs of ``generate`` and returns the job that runs and loads it.

    ``options["allowed_region"]`` may name a segment ID of ``segmentationNode`` (e.g. the organ):
    that segment is exported as a mask file for ``--allowed-region`` and is not a lesion segment.
    """
    options = dict(options or {})
    regionId = options.get("allowed_region")
    isRegionSegment = regionId is not None and segmentationNode is not None and regionId in segmentationNode.GetSegmentation().GetSegmentIDs()
    if isRegionSegment and segmentIds is None:
        segmentIds = [i for i in segmentationNode.GetSegmentation().GetSegmentIDs() if i != regionId]
    selectedIds = _selectedSegmentIds(volumeNode, segmentationNode, segmentIds)
    if isRegionSegment and regionId in selectedIds:
        raise ValueError(f"Segment '{regionId}' cannot be both a lesion to synthesize and the allowed region.")
    command = ["run"] if modelDir is None else ["sample", "--model", str(modelDir)]
    with _workDirectory() as workDir:
        imagePath, labelPath = _exportCase(volumeNode, segmentationNode, selectedIds, workDir / "case1")
        if not _labelmapHasVoxels(labelPath):
            names = ", ".join(f"'{segmentationNode.GetSegmentation().GetSegment(i).GetName()}'" for i in selectedIds)
            raise ValueError(f"Segment(s) {names} of '{segmentationNode.GetName()}' are empty on the grid of '{volumeNode.GetName()}': draw the lesion, or select another segment.")
        if isRegionSegment:
            options["allowed_region"] = _exportLabelmap(volumeNode, segmentationNode, [regionId], workDir / "case1" / "allowed.nrrd")
    arguments = [
        *command,
        "--image", str(imagePath),
        "--label", str(labelPath),
        "--out", str(workDir / "output"),
        *optionArguments(options),
    ]  # fmt: skip

    def load(doneEvent: dict) -> GenerateResult:
        return _loadSamples(Path(doneEvent["out"]), volumeNode, segmentationNode, selectedIds, modelDir, outputFolderName)

    return Job(arguments, workDir, load)


def prepareFinetune(
    volumeNodes: Sequence,
    segmentationNodes: Sequence,
    segmentIds: Sequence[str] | None = None,
    *,
    modelDir: str | Path,
    options: dict | None = None,
) -> Job:
    """Exports the inputs of ``finetune`` and returns the job that runs it."""
    if not volumeNodes or len(volumeNodes) != len(segmentationNodes):
        raise ValueError(
            f"Fine-tuning needs one segmentation per volume; got {len(volumeNodes)} volumes and "
            f"{len(segmentationNodes)} segmentations."
        )
    cases = [(v, s, _selectedSegmentIds(v, s, segmentIds)) for v, s in zip(volumeNodes, segmentationNodes)]
    arguments = ["finetune"]
    with _workDirectory() as workDir:
        for index, case in enumerate(cases, start=1):
            imagePath, labelPath = _exportCase(*case, workDir / f"case{index}")
            arguments += ["--image", str(imagePath), "--label", str(labelPath)]
    arguments += ["--model-out", str(modelDir), *optionArguments(options)]
    return Job(arguments, workDir, lambda doneEvent: Path(doneEvent["out"]))


def optionArguments(options: dict | None) -> list[str]:
    """CLI arguments from options whose keys are the long option names with underscores.

    ``True`` gives a bare flag, ``False``/``None`` nothing, a list or tuple a repeated option.
    """
    arguments = []
    for key, value in (options or {}).items():
        if key in ARGUMENTS_SET_FROM_NODES:
            raise ValueError(f"Option '{key}' is set from the input nodes; remove it from the options.")
        flag = "--" + key.replace("_", "-")
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if item is True:
                arguments.append(flag)
            elif item is not None and item is not False:
                arguments += [flag, str(item)]
    return arguments


# --- export -----------------------------------------------------------------------------------


def _selectedSegmentIds(volumeNode, segmentationNode, segmentIds: Sequence[str] | None) -> list[str]:
    """Checks the input nodes and returns the segment IDs to use (all segments when None)."""
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise ValueError("Select an input volume that has image data.")
    if segmentationNode is None:
        raise ValueError(f"Select a segmentation for '{volumeNode.GetName()}'.")
    if volumeNode.GetScene() is None or volumeNode.GetScene() is not segmentationNode.GetScene():
        raise ValueError("The input volume and segmentation must be nodes of the same scene.")
    available = list(segmentationNode.GetSegmentation().GetSegmentIDs())
    selected = available if segmentIds is None else list(segmentIds)
    if not selected:
        raise ValueError(f"'{segmentationNode.GetName()}' has no segment selected; select the segment(s) to synthesize.")
    missing = [segmentId for segmentId in selected if segmentId not in available]
    if missing:
        raise ValueError(f"'{segmentationNode.GetName()}' has no segment with ID {', '.join(missing)}.")
    return selected


@contextmanager
def _workDirectory() -> Iterator[Path]:
    """A new temporary folder, removed again if preparing the job fails."""
    workDir = Path(tempfile.mkdtemp(prefix="MedDiffFT-"))
    try:
        yield workDir
    except Exception:
        shutil.rmtree(workDir, ignore_errors=True)
        raise


def _exportCase(volumeNode, segmentationNode, segmentIds: list[str], caseDir: Path) -> tuple[Path, Path]:
    """Writes the volume and a labelmap of the segments on the volume's grid, as NRRD."""
    caseDir.mkdir(parents=True)
    imagePath = caseDir / "image.nrrd"
    _writeVolume(volumeNode, imagePath)
    return imagePath, _exportLabelmap(volumeNode, segmentationNode, segmentIds, caseDir / "label.nrrd")


def _exportLabelmap(volumeNode, segmentationNode, segmentIds: list[str], labelPath: Path) -> Path:
    """Writes a labelmap NRRD of the segments on the volume's grid.

    The labelmap holds value ``i + 1`` where ``segmentIds[i]`` is: a color table whose only entry
    is named like no segment makes ``ExportSegmentsToLabelmapNode`` number them in that order.
    """
    scratchScene = slicer.vtkMRMLScene()  # keeps temporary nodes out of the user's scene
    labelmapNode = scratchScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    colorTable = scratchScene.AddNewNodeByClass("vtkMRMLColorTableNode")
    colorTable.SetTypeToUser()
    colorTable.SetNumberOfColors(1)
    colorTable.SetColor(0, f"background-{uuid.uuid4().hex}", 0.0, 0.0, 0.0, 0.0)
    with _nodesAddedToSceneRemoved(segmentationNode.GetScene()):
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode,
            segmentIds,
            labelmapNode,
            volumeNode,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
            colorTable,
        )
    if not exported:
        raise ValueError(
            f"Could not export segments {', '.join(segmentIds)} of '{segmentationNode.GetName()}' "
            f"onto the grid of '{volumeNode.GetName()}'."
        )
    _writeVolume(labelmapNode, labelPath)
    return labelPath


@contextmanager
def _nodesAddedToSceneRemoved(scene) -> Iterator[None]:
    """Removes nodes that Slicer's export adds to the scene as a side effect (``<name>_ColorTable``)."""
    before = {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(index) for index in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before:
                scene.RemoveNode(node)


def _labelmapHasVoxels(path: Path) -> bool:
    reader = slicer.vtkMRMLVolumeArchetypeStorageNode()
    reader.SetFileName(str(path))
    labelmapNode = slicer.vtkMRMLLabelMapVolumeNode()
    return bool(reader.ReadData(labelmapNode)) and labelmapNode.GetImageData().GetScalarRange()[1] > 0


def _writeVolume(node, path: Path) -> None:
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(str(path))
    storageNode.SetUseCompression(False)
    if not storageNode.WriteData(node):
        raise RuntimeError(f"Could not write '{node.GetName()}' to {path}.")


# --- import -----------------------------------------------------------------------------------


def _loadSamples(
    outDir: Path, volumeNode, segmentationNode, segmentIds: list[str], modelDir, outputFolderName: str | None
) -> GenerateResult:
    """Reads every sample of the manifest, then adds all of them to the scene in one new folder."""
    manifest = json.loads((outDir / "manifest.json").read_text(encoding="utf-8"))
    samples = [
        (
            sample,
            _readVolume(outDir / sample["image"], slicer.vtkMRMLScalarVolumeNode, volumeNode, sameScalarType=True),
            _segmentationFromLabelmap(
                _readVolume(outDir / sample["label"], slicer.vtkMRMLLabelMapVolumeNode, volumeNode),
                segmentationNode,
                segmentIds,
            ),
        )
        for sample in manifest["samples"]
    ]
    runId = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    provenance = {
        "RunId": runId,
        "Model": str(Path(modelDir).resolve()) if modelDir is not None else json.dumps(manifest.get("model", {})),
    }
    scene = volumeNode.GetScene()
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    inputItem = shNode.GetItemByDataNode(volumeNode)
    parentItem = shNode.GetItemParent(inputItem) if inputItem else shNode.GetSceneItemID()
    folderName = outputFolderName or f"MedDiffFT {volumeNode.GetName()}"
    folderItem = shNode.CreateFolderItem(parentItem, shNode.GenerateUniqueItemName(folderName))
    shNode.SetItemAttribute(folderItem, ATTRIBUTE_PREFIX + "RunId", runId)
    result = GenerateResult(volumes=[], segmentations=[], folderItemId=folderItem, runId=runId)
    for index, (sample, synthVolume, synthSegmentation) in enumerate(samples, start=1):
        synthVolume.SetName(scene.GenerateUniqueName(f"{volumeNode.GetName()}_synth{index:02d}"))
        synthSegmentation.SetName(scene.GenerateUniqueName(f"{synthVolume.GetName()} segmentation"))
        for node in (synthVolume, synthSegmentation):
            scene.AddNode(node)
            node.CreateDefaultDisplayNodes()
            node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
            node.SetNodeReferenceID(SOURCE_VOLUME_REFERENCE_ROLE, volumeNode.GetID())
            for key, value in {**provenance, "Seed": str(sample["seed"])}.items():
                node.SetAttribute(ATTRIBUTE_PREFIX + key, value)
            shNode.CreateItem(folderItem, node)
        synthSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(synthVolume)
        synthSegmentation.SetNodeReferenceID(synthSegmentation.GetReferenceImageGeometryReferenceRole(), synthVolume.GetID())
        result.volumes.append(synthVolume)
        result.segmentations.append(synthSegmentation)
    return result


def _readVolume(path: Path, nodeClass, referenceNode, sameScalarType: bool = False):
    """A new node (not in a scene) with the voxels of ``path``, checked to lie on the reference's
    grid, and exactly the reference's IJK-to-RAS matrix.

    The file's geometry can differ in the last bits (NRRD stores LPS), and volume nodes ignore
    geometry changes below a tolerance, so the voxels go into a fresh node whose origin, spacing
    and directions are copied one by one (``CopyOrientation`` re-decomposes the matrix, which
    rounds as well).
    """
    fileNode = nodeClass()
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(str(path))
    if not storageNode.ReadData(fileNode):
        raise RuntimeError(f"Could not read the library output {path}.")
    image, reference = fileNode.GetImageData(), referenceNode.GetImageData()
    fileMatrix, referenceMatrix = _ijkToRas(fileNode), _ijkToRas(referenceNode)
    offGrid = image.GetDimensions() != reference.GetDimensions() or any(
        abs(fileMatrix.GetElement(row, column) - referenceMatrix.GetElement(row, column)) > GEOMETRY_TOLERANCE_MM
        for row in range(3)
        for column in range(4)
    )
    if offGrid:
        raise RuntimeError(f"The library output {path.name} is not on the grid of '{referenceNode.GetName()}'.")
    if sameScalarType and (image.GetScalarType(), image.GetNumberOfScalarComponents()) != (
        reference.GetScalarType(),
        reference.GetNumberOfScalarComponents(),
    ):
        raise RuntimeError(
            f"The library output {path.name} has voxel type {image.GetScalarTypeAsString()}, "
            f"the input '{referenceNode.GetName()}' has {reference.GetScalarTypeAsString()}."
        )
    node = nodeClass()
    node.SetOrigin(referenceNode.GetOrigin())
    node.SetSpacing(referenceNode.GetSpacing())
    directions = vtk.vtkMatrix4x4()
    referenceNode.GetIJKToRASDirectionMatrix(directions)
    node.SetIJKToRASDirectionMatrix(directions)
    node.SetAndObserveImageData(image)
    return node


def _segmentationFromLabelmap(labelmapNode, sourceSegmentationNode, segmentIds: list[str]):
    """A new segmentation node (not in a scene) with the source's segments (ID, name, color,
    terminology), each filled from its label value (``segmentIds[i]`` has value ``i + 1``)."""
    segmentationNode = slicer.vtkMRMLSegmentationNode()
    for segmentId in segmentIds:
        segment = slicer.vtkSegment()
        segment.DeepCopyMetadata(sourceSegmentationNode.GetSegmentation().GetSegment(segmentId))
        segmentationNode.GetSegmentation().AddSegment(segment, segmentId)
    labelOrder = vtk.vtkStringArray()
    for segmentId in segmentIds:
        labelOrder.InsertNextValue(segmentId)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode, labelOrder):
        raise RuntimeError("Could not convert a synthetic label to segments.")
    return segmentationNode


def _ijkToRas(volumeNode) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix
