"""The Slicer module's MRML bridge and process runner against real MRML nodes (slicer-core, no
Slicer application) and the real library with a tiny model: nodes in, nodes out, on exactly the
input's grid; nothing added on failure or cancel; the subprocess path the GUI uses."""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
import nrrd  # noqa: E402
import vtk  # noqa: E402
from MedDiffFTLib.errors import Cancelled, MedDiffFTError  # noqa: E402
from MedDiffFTLib.generate import sample_seed  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedDiffFT"))  # as Slicer does for a module folder

from mrml_fixtures import mrml  # noqa: E402,F401
from MedDiffFTSlicerLib import MRMLBridge, SyntheticCase  # noqa: E402
from MedDiffFTSlicerLib.CLIProcess import CLIProcess, parseLine  # noqa: E402

TINY = {
    "train_steps": 4, "batch_size": 2, "resolution": 32, "samples": 2, "seed": 0, "sampling_steps": 3, "device": "cpu",
    "model_size": "tiny", "mask_steps": 2, "mask_resolution": 16,
    "qa": "off",  # a 4-step model paints noise, which quality assessment rejects
}  # fmt: skip
LESION = SyntheticCase.blobMask((3, 12, 12), (1.5, 4, 5))
CYST = SyntheticCase.blobMask((2, 5, 18), (1.2, 3, 3))


@pytest.fixture
def workRoot(tmp_path, monkeypatch):
    """Temporary work folders go here, so tests can check that none is left behind."""
    root = tmp_path / "work"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture
def case(mrml):
    """A study folder holding an oblique CT and a segmentation with a lesion and a cyst."""
    scene = mrml.scene
    volumeNode = SyntheticCase.addObliqueVolume(scene, "CT")
    segmentationNode = SyntheticCase.addSegmentation(
        scene, volumeNode, [("lesion", "Lesion", (0.9, 0.2, 0.1), LESION), ("cyst", "Cyst", (0.1, 0.3, 0.9), CYST)]
    )
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    studyItem = shNode.CreateFolderItem(shNode.GetSceneItemID(), "Study")
    for node in (volumeNode, segmentationNode):
        shNode.CreateItem(studyItem, node)
    return scene, volumeNode, segmentationNode, shNode, studyItem


def ijkToRas(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def segmentMask(segmentationNode, segmentId, referenceVolume) -> np.ndarray:
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolume).astype(bool)


def snapshot(volumeNode, segmentationNode) -> dict:
    """What must not change on the input nodes."""
    segmentation = segmentationNode.GetSegmentation()
    return {
        "voxels": slicer.util.arrayFromVolume(volumeNode).copy(),
        "matrix": ijkToRas(volumeNode),
        "segments": [
            (i, segmentation.GetSegment(i).GetName(), segmentation.GetSegment(i).GetColor(), segmentMask(segmentationNode, i, volumeNode))
            for i in segmentation.GetSegmentIDs()
        ],
        "attributes": (volumeNode.GetAttributeNames(), segmentationNode.GetAttributeNames()),
        "storage": (volumeNode.GetStorageNodeID(), segmentationNode.GetStorageNodeID()),
        "mtime": (volumeNode.GetMTime(), segmentationNode.GetMTime()),
    }


def assertSnapshotsEqual(before: dict, after: dict) -> None:
    np.testing.assert_array_equal(after["voxels"], before["voxels"])
    np.testing.assert_array_equal(after["matrix"], before["matrix"])
    assert [s[:3] for s in after["segments"]] == [s[:3] for s in before["segments"]]
    for (_, _, _, maskAfter), (_, _, _, maskBefore) in zip(after["segments"], before["segments"]):
        np.testing.assert_array_equal(maskAfter, maskBefore)
    assert (after["attributes"], after["storage"], after["mtime"]) == (before["attributes"], before["storage"], before["mtime"])


def test_option_arguments_follow_the_cli_spelling():
    options = {"train_steps": 200, "overwrite": True, "resume": False, "init_model": None, "background": ["a.nrrd", "b.nrrd"]}
    assert MRMLBridge.optionArguments(options) == ["--train-steps", "200", "--overwrite", "--background", "a.nrrd", "--background", "b.nrrd"]
    with pytest.raises(ValueError, match="out"):
        MRMLBridge.optionArguments({"out": "/tmp/x"})


def test_export_numbers_segments_in_selection_order_and_adds_nothing(case, workRoot):
    scene, volumeNode, segmentationNode, *_ = case
    before, nodeCount = snapshot(volumeNode, segmentationNode), scene.GetNumberOfNodes()

    job = MRMLBridge.prepareGenerate(volumeNode, segmentationNode, ["cyst", "lesion"], options=TINY)

    assert job.arguments[:1] == ["run"] and "--samples" in job.arguments
    image, imageHeader = nrrd.read(job.arguments[job.arguments.index("--image") + 1])
    label, _ = nrrd.read(job.arguments[job.arguments.index("--label") + 1])
    np.testing.assert_array_equal(image.transpose(2, 1, 0), before["voxels"])  # pynrrd is (I, J, K)
    assert imageHeader["type"] == "short"
    np.testing.assert_array_equal(label.transpose(2, 1, 0), CYST * 1 + (LESION & ~CYST) * 2)
    assert scene.GetNumberOfNodes() == nodeCount  # Slicer's export side effects are removed too
    assertSnapshotsEqual(before, snapshot(volumeNode, segmentationNode))
    job.discard()
    assert not list(workRoot.glob("MedDiffFT-*"))


def test_generate_adds_pairs_on_the_input_grid_in_one_folder(case, workRoot):
    scene, volumeNode, segmentationNode, shNode, studyItem = case
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT_synth01")  # the name is taken
    before = snapshot(volumeNode, segmentationNode)
    events = []

    options = {**TINY, "mask_source": "label"}  # segments stay in place: their label values can be checked
    result = MRMLBridge.generate(volumeNode, segmentationNode, ["cyst", "lesion"], options=options, progress=events.append)

    assert [node.GetName() for node in result.volumes] == ["CT_synth01_1", "CT_synth02"]
    assert [node.GetName() for node in result.segmentations] == ["CT_synth01_1 segmentation", "CT_synth02 segmentation"]
    assert {event["stage"] for event in events if "stage" in event} >= {"finetune"}
    assert events[-1]["event"] == "done"
    assert shNode.GetItemParent(result.folderItemId) == studyItem
    assert shNode.GetItemName(result.folderItemId) == "MedDiffFT CT"
    inputSegments = segmentationNode.GetSegmentation()
    for index, (synthVolume, synthSegmentation) in enumerate(zip(result.volumes, result.segmentations)):
        assert synthVolume.GetScene() is scene and synthSegmentation.GetScene() is scene
        np.testing.assert_array_equal(ijkToRas(synthVolume), before["matrix"])
        voxels = slicer.util.arrayFromVolume(synthVolume)
        assert voxels.dtype == np.int16 and voxels.shape == before["voxels"].shape
        assert not np.array_equal(voxels, before["voxels"])  # something was painted
        segments = synthSegmentation.GetSegmentation()
        assert list(segments.GetSegmentIDs()) == ["cyst", "lesion"]
        for segmentId in ("cyst", "lesion"):
            assert segments.GetSegment(segmentId).GetName() == inputSegments.GetSegment(segmentId).GetName()
            assert segments.GetSegment(segmentId).GetColor() == inputSegments.GetSegment(segmentId).GetColor()
        cyst, lesion = (segmentMask(synthSegmentation, i, synthVolume) for i in ("cyst", "lesion"))
        assert (cyst & CYST).sum() > (cyst & LESION & ~CYST).sum()  # label values map back to the right segments
        assert (lesion & LESION & ~CYST).sum() > (lesion & CYST).sum()
        for node in (synthVolume, synthSegmentation):
            assert shNode.GetItemParent(shNode.GetItemByDataNode(node)) == result.folderItemId
            assert node.GetAttribute("MedDiffFT.Seed") == str(sample_seed(TINY["seed"], before["voxels"], index))
            assert node.GetAttribute("MedDiffFT.RunId") == result.runId
            assert json.loads(node.GetAttribute("MedDiffFT.Model"))["backbone"] == "compact"
            assert node.GetNodeReference(MRMLBridge.SOURCE_VOLUME_REFERENCE_ROLE) is volumeNode
        assert synthSegmentation.GetNodeReference(synthSegmentation.GetReferenceImageGeometryReferenceRole()) is synthVolume
    assertSnapshotsEqual(before, snapshot(volumeNode, segmentationNode))
    assert not list(workRoot.glob("MedDiffFT-*"))


def test_generate_from_a_segmentation_loaded_from_seg_nrrd(case, workRoot, tmp_path):
    """A segmentation the user loaded from a .seg.nrrd file (with its storage node) works like one
    made in the scene: output on the input grid, segment names kept, inputs untouched."""
    scene, volumeNode, segmentationNode, *_ = case
    path = tmp_path / "case.seg.nrrd"
    writer = slicer.vtkMRMLSegmentationStorageNode()
    writer.SetFileName(str(path))
    assert writer.WriteData(segmentationNode)
    loadedNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Loaded segmentation")
    storageNode = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storageNode.SetFileName(str(path))
    loadedNode.SetAndObserveStorageNodeID(storageNode.GetID())
    assert storageNode.ReadData(loadedNode)
    loaded = loadedNode.GetSegmentation()
    names = [loaded.GetSegment(i).GetName() for i in loaded.GetSegmentIDs()]
    assert sorted(names) == ["Cyst", "Lesion"]
    before = snapshot(volumeNode, loadedNode)
    original = snapshot(volumeNode, segmentationNode)

    result = MRMLBridge.generate(volumeNode, loadedNode, options=TINY)

    assert len(result.volumes) == len(result.segmentations) == 2
    for synthVolume, synthSegmentation in zip(result.volumes, result.segmentations):
        np.testing.assert_array_equal(ijkToRas(synthVolume), before["matrix"])
        segments = synthSegmentation.GetSegmentation()
        assert [segments.GetSegment(i).GetName() for i in segments.GetSegmentIDs()] == names
    assertSnapshotsEqual(before, snapshot(volumeNode, loadedNode))
    assertSnapshotsEqual(original, snapshot(volumeNode, segmentationNode))
    assert loadedNode.GetStorageNode() is storageNode and storageNode.GetFileName() == str(path)
    assert not list(workRoot.glob("MedDiffFT-*"))


def test_allowed_region_segment_confines_new_lesions(case, workRoot):
    """``allowed_region`` naming a segment: it goes to the library as a mask file, new lesions from
    the mask generator lie inside it, and it is not synthesized itself."""
    scene, volumeNode, segmentationNode, *_ = case
    organ = SyntheticCase.blobMask((2.5, 12, 12), (3, 9, 9))
    segmentationNode.GetSegmentation().AddEmptySegment("organ", "Organ", (0.8, 0.8, 0.2))
    slicer.util.updateSegmentBinaryLabelmapFromArray(organ.astype(np.uint8), segmentationNode, "organ", volumeNode)
    before = snapshot(volumeNode, segmentationNode)

    result = MRMLBridge.generate(volumeNode, segmentationNode, options={**TINY, "allowed_region": "organ", "samples": 1})

    synthSegmentation = result.segmentations[0]
    assert list(synthSegmentation.GetSegmentation().GetSegmentIDs()) == ["lesion", "cyst"]
    newLesions = segmentMask(synthSegmentation, "lesion", result.volumes[0]) | segmentMask(synthSegmentation, "cyst", result.volumes[0])
    assert newLesions.any() and not (newLesions & ~organ).any()
    assertSnapshotsEqual(before, snapshot(volumeNode, segmentationNode))
    with pytest.raises(ValueError, match="both a lesion to synthesize and the allowed region"):
        MRMLBridge.generate(volumeNode, segmentationNode, ["lesion", "organ"], options={**TINY, "allowed_region": "organ"})
    assert not list(workRoot.glob("MedDiffFT-*"))


@pytest.mark.parametrize(
    "segmentIds, kwargs, error, message",
    [
        (["empty"], {}, ValueError, r"Segment\(s\) 'Empty' of 'Segmentation' are empty on the grid of 'CT': draw the lesion"),
        (["lesion"], {"cancel": lambda: True}, Cancelled, "Cancelled by the user"),
        (["missing"], {}, ValueError, "'Segmentation' has no segment with ID missing"),
    ],
    ids=["empty-segment", "cancel", "unknown-segment"],
)
def test_failure_or_cancel_adds_nothing(case, workRoot, segmentIds, kwargs, error, message):
    scene, volumeNode, segmentationNode, shNode, _ = case
    segmentationNode.GetSegmentation().AddEmptySegment("empty", "Empty", (0.0, 1.0, 0.0))
    before, nodeCount, itemCount = snapshot(volumeNode, segmentationNode), scene.GetNumberOfNodes(), shNode.GetNumberOfItems()

    with pytest.raises(error, match=message):
        MRMLBridge.generate(volumeNode, segmentationNode, segmentIds, options=TINY, **kwargs)

    assert (scene.GetNumberOfNodes(), shNode.GetNumberOfItems()) == (nodeCount, itemCount)
    assertSnapshotsEqual(before, snapshot(volumeNode, segmentationNode))
    assert not list(workRoot.glob("MedDiffFT-*"))


def test_finetuned_model_folder_is_used_by_generate(case, tmp_path):
    scene, volumeNode, segmentationNode, *_ = case
    modelDir = tmp_path / "model"
    training = {key: TINY[key] for key in ("train_steps", "batch_size", "resolution", "seed", "device", "model_size", "mask_steps", "mask_resolution", "qa")}

    assert MRMLBridge.finetune([volumeNode], [segmentationNode], ["lesion"], modelDir=modelDir, options=training) == modelDir
    assert (modelDir / "meddiffft.json").is_file()
    sampling = {key: TINY[key] for key in ("samples", "seed", "sampling_steps", "device", "qa")}
    result = MRMLBridge.generate(volumeNode, segmentationNode, ["lesion"], modelDir=modelDir, options=sampling, outputFolderName="Synthetic")

    assert len(result.volumes) == 2
    assert {node.GetAttribute("MedDiffFT.Model") for node in result.volumes} == {str(modelDir.resolve())}
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert shNode.GetItemName(result.folderItemId) == "Synthetic"


def test_parse_line_accepts_json_objects_only():
    assert parseLine('{"stage": "sample", "step": 2, "total": 3}') == {"stage": "sample", "step": 2, "total": 3}
    assert parseLine("UserWarning: something") is None
    assert parseLine("[1, 2]") is None


def test_subprocess_run_reports_progress_and_loads_nodes(case, workRoot):
    """The GUI path without Qt: the job's arguments in a child Python reading --progress json."""
    scene, volumeNode, segmentationNode, *_ = case
    job = MRMLBridge.prepareGenerate(volumeNode, segmentationNode, ["lesion"], options=TINY)
    progress, log = [], []

    process = CLIProcess(job.arguments, job.workDir, python=sys.executable, onProgress=progress.append, onLog=log.append, useStartupEnvironment=False)
    done = process.wait()
    result = job.load(done)
    job.discard()

    stages = [event["stage"] for event in progress]
    assert stages[0] == "finetune" and stages[-1] != "finetune"
    assert all(0 < event["step"] <= event["total"] for event in progress)
    assert [event["step"] for event in progress if event["stage"] == "finetune"] == [1, 2, 3, 4]
    assert done["event"] == "done" and done["samples"] == 2
    assert [node.GetName() for node in result.volumes] == ["CT_synth01", "CT_synth02"]
    np.testing.assert_array_equal(ijkToRas(result.volumes[0]), ijkToRas(volumeNode))
    assert not list(workRoot.glob("MedDiffFT-*"))


def test_subprocess_error_carries_the_library_message(case, workRoot, tmp_path):
    scene, volumeNode, segmentationNode, *_ = case
    job = MRMLBridge.prepareGenerate(volumeNode, segmentationNode, modelDir=tmp_path / "no-model", options={"device": "cpu"})

    process = CLIProcess(job.arguments, job.workDir, python=sys.executable, useStartupEnvironment=False)
    with pytest.raises(MedDiffFTError, match="no-model") as raised:
        process.wait()
    job.discard()

    assert not isinstance(raised.value, Cancelled)
    assert process.returnCode == 2


@pytest.mark.parametrize("killGracePeriod", [60.0, 0.0], ids=["cancel-file", "kill-tree"])
def test_subprocess_cancel_stops_the_whole_process_tree(case, workRoot, tmp_path, killGracePeriod):
    """Cancel through the cancel file, or (no grace) by killing the tree of a launcher-like parent
    that runs Python as its child, as PythonSlicer does."""
    psutil = pytest.importorskip("psutil")
    scene, volumeNode, segmentationNode, *_ = case
    launcher = tmp_path / "launcher.sh"
    launcher.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\n')
    launcher.chmod(0o755)
    job = MRMLBridge.prepareGenerate(volumeNode, segmentationNode, ["lesion"], options={**TINY, "train_steps": 100000})
    progress = []
    process = CLIProcess(
        job.arguments, job.workDir, python=str(launcher), onProgress=progress.append, useStartupEnvironment=False, killGracePeriod=killGracePeriod
    )
    tree = []

    def cancelOnceTraining() -> bool:
        if progress and not tree:
            tree.extend(psutil.Process(process.pid).children(recursive=True))
        return bool(progress)

    with pytest.raises(Cancelled):
        process.wait(shouldCancel=cancelOnceTraining)
    job.discard()

    assert tree and not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in tree)
    assert progress[-1]["step"] < 100000
    assert process.returnCode == (3 if killGracePeriod else -9)


@pytest.fixture
def logicModule(monkeypatch):
    """``MedDiffFTSlicerLib.Logic`` imported with stand-ins for the Slicer application's Python
    modules it needs at import time (Qt, i18n, parameter node wrapper, ScriptedLoadableModule),
    which slicer-core does not have."""
    stubs = {
        "qt": {"QTimer": object},
        "slicer.i18n": {"tr": lambda text: text},
        "slicer.parameterNodeWrapper": {"parameterNodeWrapper": lambda cls: cls, "Choice": lambda *a: None, "WithinRange": lambda *a: None},
        "slicer.ScriptedLoadableModule": {"ScriptedLoadableModuleLogic": type("ScriptedLoadableModuleLogic", (), {"__init__": lambda self: None})},
    }
    for name, attributes in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "MedDiffFTSlicerLib.Logic", raising=False)
    yield importlib.import_module("MedDiffFTSlicerLib.Logic")
    sys.modules.pop("MedDiffFTSlicerLib.Logic", None)


def test_logic_prepares_the_commands_of_each_mode(logicModule, case, tmp_path, workRoot):
    """Each mode runs the commands it needs, each with only the options that command accepts."""
    Mode = logicModule.Mode
    scene, volumeNode, segmentationNode, *_ = case
    modelDir, noFolder = tmp_path / "model", Path()
    parameters = types.SimpleNamespace(
        inputVolume=volumeNode, inputSegmentation=segmentationNode, segmentIds=["lesion"], samples=2, seed=5,
        trainSteps=7, samplingSteps=3, resolution=32, device="cpu", allowedRegionSegmentId="cyst", backbone="compact",
        baseModel="", guidanceScale=3.0, maskSource="generator", oldLesion="keep", placement="learned", qa=True, erode="auto",
    )  # fmt: skip
    logic = logicModule.MedDiffFTLogic()
    expected = {
        (Mode.FINETUNE_AND_GENERATE, modelDir): [("finetune", "--train-steps"), ("sample", "--samples")],
        (Mode.FINETUNE_AND_GENERATE, noFolder): [("run", "--train-steps", "--samples")],
        (Mode.GENERATE, modelDir): [("sample", "--samples")],
        (Mode.FINETUNE, modelDir): [("finetune", "--train-steps")],
    }
    parser = importlib.import_module("MedDiffFTLib.cli").build_parser()
    for (mode, folder), commands in expected.items():
        parameters.mode, parameters.modelFolder = mode, folder
        jobs = logic.jobs(parameters, overwriteModel=True)
        for job, (command, *options) in zip(jobs, commands, strict=True):
            assert job.arguments[0] == command and set(options) <= set(job.arguments)
            parser.parse_args(job.arguments)  # the command accepts every option it gets
            assert ("--overwrite" in job.arguments) == (command == "finetune")
            assert ("--model-out" in job.arguments or "--model" in job.arguments) == (command != "run")
            if command != "finetune":  # the allowed-region segment went out as a mask file
                assert Path(job.arguments[job.arguments.index("--allowed-region") + 1]).is_file()
                assert job.arguments[job.arguments.index("--old-lesion") + 1] == "keep"
                assert job.arguments[job.arguments.index("--placement") + 1] == "learned"
            job.discard()
    parameters.mode, parameters.modelFolder = Mode.GENERATE, noFolder
    with pytest.raises(ValueError, match="model folder"):
        logic.jobs(parameters)
    assert not list(workRoot.glob("MedDiffFT-*"))
