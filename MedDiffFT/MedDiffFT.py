"""MedDiffFT: fine-tune a diffusion inpainting model on a few labeled cases and generate synthetic
image + segmentation pairs into the scene.

Kept thin: the widget, logic, MRML bridge and process runner live in ``MedDiffFTSlicerLib``, the
method in the pure library ``MedDiffFTLib``. Scripts use the logic::

    import MedDiffFT
    result = MedDiffFT.MedDiffFTLogic().generate(volumeNode, segmentationNode, options={"samples": 4})
"""

import importlib.util
import os
import sys

import numpy as np
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

# A source checkout added as an additional module path keeps MedDiffFTLib next to this folder.
_checkoutRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_checkoutRoot, "MedDiffFTLib")) and _checkoutRoot not in sys.path:
    sys.path.append(_checkoutRoot)

from MedDiffFTSlicerLib.Logic import MedDiffFTLogic  # noqa: E402
from MedDiffFTSlicerLib.Widget import MedDiffFTWidget  # noqa: E402

__all__ = ["MedDiffFT", "MedDiffFTLogic", "MedDiffFTTest", "MedDiffFTWidget"]


class MedDiffFT(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedDiffFT")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDiffFT developers"]
        self.parent.helpText = _(
            "Fine-tunes a diffusion inpainting model on the current volume and segmentation (a few "
            "labeled cases are enough) and generates new, realistic image + segmentation pairs with "
            "exactly aligned labels. Results are added to the scene in one folder per run. "
            "Training and sampling run in a separate process: Slicer stays usable and a run can be "
            "cancelled."
        )
        self.parent.acknowledgementText = _(
            "Implements MedDiff-FT (Xie et al., MICCAI 2025, arXiv 2507.00377) with a compact "
            "pixel-space backbone that trains on a CPU."
        )


class MedDiffFTTest(ScriptedLoadableModuleTest):
    """In-Slicer test: a synthetic oblique volume with a blob segment and tiny model settings, run
    in-process through the logic (no downloads, no GPU). Skipped where PyTorch is not installed
    (the extension build machines)."""

    TINY_OPTIONS = {
        "train_steps": 4,
        "batch_size": 2,
        "resolution": 32,
        "samples": 2,
        "seed": 0,
        "sampling_steps": 3,
        "device": "cpu",
        "model_size": "tiny",
    }

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if importlib.util.find_spec("torch") is None:
            self.skipTest("PyTorch is not installed")
        self.setUp()
        self.test_generate_adds_pairs_on_the_input_grid()

    def test_generate_adds_pairs_on_the_input_grid(self):
        from MedDiffFTSlicerLib import SyntheticCase

        volumeNode = SyntheticCase.addObliqueVolume(slicer.mrmlScene, "CT")
        blob = SyntheticCase.blobMask((3, 12, 12), (1.5, 4, 5))
        segmentationNode = SyntheticCase.addSegmentation(slicer.mrmlScene, volumeNode, [("lesion", "Lesion", (0.9, 0.2, 0.2), blob)])

        result = MedDiffFTLogic().generate(volumeNode, segmentationNode, options=self.TINY_OPTIONS)

        self.assertEqual([node.GetName() for node in result.volumes], ["CT_synth01", "CT_synth02"])
        inputMatrix = slicer.util.arrayFromVTKMatrix(_ijkToRas(volumeNode))
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        for synthVolume, synthSegmentation in zip(result.volumes, result.segmentations):
            np.testing.assert_array_equal(slicer.util.arrayFromVTKMatrix(_ijkToRas(synthVolume)), inputMatrix)
            self.assertEqual(slicer.util.arrayFromVolume(synthVolume).dtype, np.int16)
            self.assertEqual(synthSegmentation.GetSegmentation().GetSegment("lesion").GetName(), "Lesion")
            self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(synthVolume)), result.folderItemId)


def _ijkToRas(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix
