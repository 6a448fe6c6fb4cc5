"""An MRML scene for pytest without the Slicer application (slicer-core).

``mrml`` is the fixture of docs/slicer.md section 4: a scene with the application, color, volumes,
segmentations and subject-hierarchy logics, plus the ``slicer.mrmlScene``/``slicer.modules`` shim
that ``slicer.util``'s segment helpers need, with VTK's stderr logger silenced. Import it into a
test module to use it.
"""

from __future__ import annotations

import types

import pytest


@pytest.fixture
def mrml():
    slicer = pytest.importorskip("slicer")
    import vtk
    from slicer import (
        vtkMRMLColorLogic,
        vtkMRMLScene,
        vtkSlicerApplicationLogic,
        vtkSlicerSegmentationsModuleLogic,
        vtkSlicerSubjectHierarchyModuleLogic,
        vtkSlicerVolumesLogic,
    )

    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    scene, app = vtkMRMLScene(), vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    logics = {}  # strong references: the application logic keeps only weak ones
    for name, logicClass in [
        ("Colors", vtkMRMLColorLogic),
        ("Volumes", vtkSlicerVolumesLogic),
        ("Segmentations", vtkSlicerSegmentationsModuleLogic),
        ("SubjectHierarchy", vtkSlicerSubjectHierarchyModuleLogic),
    ]:
        logic = logics[name] = logicClass()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
    previous = {name: getattr(slicer, name, None) for name in ("mrmlScene", "modules")}
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: logics["Volumes"]),
        segmentations=types.SimpleNamespace(logic=lambda: logics["Segmentations"]),
    )
    yield types.SimpleNamespace(scene=scene, app=app, **{name.lower(): logic for name, logic in logics.items()})
    for name, value in previous.items():
        if value is None:
            delattr(slicer, name)
        else:
            setattr(slicer, name, value)
    scene.Clear(1)
