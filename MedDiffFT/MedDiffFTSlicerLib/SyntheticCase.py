"""A small synthetic case for tests (pytest under slicer-core and MedDiffFTTest in Slicer): an
int16 CT-like volume of 24 x 24 x 6 anisotropic voxels, LPS-flipped and obliquely rotated, and a
segmentation of ellipsoid blobs on its grid. No downloads."""

from __future__ import annotations

import numpy as np
import slicer
import vtk

SHAPE_KJI = (6, 24, 24)
SPACING = (0.7, 0.9, 2.5)


def addObliqueVolume(scene, name: str = "CT"):
    k, j, i = np.meshgrid(*[np.arange(n) for n in SHAPE_KJI], indexing="ij")
    noise = np.random.default_rng(7).normal(0.0, 5.0, SHAPE_KJI)
    voxels = (40 * np.sin(i / 3.0) + 30 * np.cos(j / 4.0) + 10 * k + noise).astype(np.int16)
    volumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(volumeNode, voxels)
    directions = vtk.vtkTransform()
    directions.RotateX(20)
    directions.RotateZ(30)
    directions.Scale(-1, -1, 1)
    volumeNode.SetIJKToRASDirectionMatrix(directions.GetMatrix())
    volumeNode.SetSpacing(*SPACING)
    volumeNode.SetOrigin(12.5, -30.0, 7.25)
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


def blobMask(centerKJI, radiiKJI) -> np.ndarray:
    """A boolean ellipsoid on the volume's (K, J, I) array grid."""
    grid = np.meshgrid(*[np.arange(n) for n in SHAPE_KJI], indexing="ij")
    return sum(((axis - center) / radius) ** 2 for axis, center, radius in zip(grid, centerKJI, radiiKJI)) <= 1.0


def addSegmentation(scene, volumeNode, segments, name: str = "Segmentation"):
    """A segmentation on ``volumeNode``'s grid; ``segments`` is ``[(id, name, color, maskKJI)]``.

    Uses ``slicer.util.updateSegmentBinaryLabelmapFromArray``, which needs ``slicer.mrmlScene``
    (in pytest, the fixture's shim)."""
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    for segmentId, segmentName, color, mask in segments:
        segmentationNode.GetSegmentation().AddEmptySegment(segmentId, segmentName, color)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentationNode, segmentId, volumeNode)
    return segmentationNode
