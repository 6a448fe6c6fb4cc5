"""The Slicer extension's files stay consistent without a Slicer build: CMake lists match the
folders (the build ships only listed files and fails on missing ones), the layers keep their
imports, the UI matches the code that uses it, and the packaging metadata agrees."""

from __future__ import annotations

import ast
import json
import re
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "MedDiffFT"
LIBRARY_DIR = REPO / "MedDiffFTLib"
SLICER_LIB_DIR = MODULE_DIR / "MedDiffFTSlicerLib"
SLICER_PROVIDED_PACKAGES = {"torch", "numpy", "simpleitk"}  # installed by PyTorchUtils / shipped with Slicer


CMAKE_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|#[^\n]*|[()]|[^\s()"#]+')


def cmakeLists(path: Path) -> dict[str, list[str]]:
    """Values of every ``set(NAME value...)`` in a CMake file (quoted values keep their quotes),
    with ``${VAR}`` of earlier sets expanded."""
    tokens = [token for token in CMAKE_TOKEN.findall(path.read_text(encoding="utf-8")) if not token.startswith("#")]
    variables: dict[str, list[str]] = {}
    for index, token in enumerate(tokens[:-1]):
        if token == "set" and tokens[index + 1] == "(":
            name, *values = tokens[index + 2 : tokens.index(")", index)]
            variables[name] = [
                re.sub(r"\$\{(\w+)\}", lambda match: " ".join(variables[match.group(1)]), value) for value in values
            ]
    return variables


def shippedFiles(folder: Path) -> set[str]:
    return {
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.name != "CMakeLists.txt"
    }


def importedTopLevelNames(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def requirementName(requirement: str) -> str:
    return re.split(r"[<>=!~;\[\s]", requirement.strip(), maxsplit=1)[0].lower()


def test_library_cmake_lists_every_module_and_nothing_else():
    listed = cmakeLists(LIBRARY_DIR / "CMakeLists.txt")["MedDiffFTLib_PYTHON_SCRIPTS"]
    onDisk = {path.relative_to(REPO).as_posix() for path in LIBRARY_DIR.rglob("*.py") if "__pycache__" not in path.parts}
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert sorted(onDisk - set(listed)) == [], "add these to MedDiffFTLib/CMakeLists.txt"
    assert sorted(set(listed) - onDisk) == [], "remove these from MedDiffFTLib/CMakeLists.txt"


def test_module_cmake_lists_every_shipped_file_and_nothing_else():
    lists = cmakeLists(MODULE_DIR / "CMakeLists.txt")
    listed = lists["MODULE_PYTHON_SCRIPTS"] + lists["MODULE_PYTHON_RESOURCES"]
    assert lists["MODULE_NAME"] == ["MedDiffFT"]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert sorted(shippedFiles(MODULE_DIR) - set(listed)) == [], "add these to MedDiffFT/CMakeLists.txt"
    assert sorted(set(listed) - shippedFiles(MODULE_DIR)) == [], "remove these from MedDiffFT/CMakeLists.txt"
    assert all(path.endswith(".py") for path in lists["MODULE_PYTHON_SCRIPTS"])


def test_module_folder_has_one_top_level_python_file():
    """Slicer loads every top-level .py of a module folder as a module of its own."""
    assert [path.name for path in MODULE_DIR.glob("*.py")] == ["MedDiffFT.py"]


def test_cmake_files_have_the_template_shape():
    extension = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    metadata = cmakeLists(REPO / "CMakeLists.txt")
    assert metadata["EXTENSION_DEPENDS"] == ['"PyTorch"']
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert metadata[key], key
    order = ["find_package(Slicer REQUIRED)", "add_subdirectory(MedDiffFTLib)", "add_subdirectory(MedDiffFT)", "## NEXT_MODULE", "${Slicer_EXTENSION_CPACK}"]
    assert [extension.index(marker) for marker in order] == sorted(extension.index(marker) for marker in order)
    for url in metadata["EXTENSION_ICONURL"] + metadata["EXTENSION_SCREENSHOTURLS"]:
        assert (REPO / url.strip('"').split("/main/", 1)[1]).is_file(), url
    module = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "WITH_GENERIC_TESTS" in module
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module
    assert "class MedDiffFTTest(ScriptedLoadableModuleTest)" in (MODULE_DIR / "MedDiffFT.py").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", sorted(LIBRARY_DIR.rglob("*.py")), ids=lambda path: path.name)
def test_library_does_not_import_slicer_qt_or_vtk(path):
    assert importedTopLevelNames(path) & {"slicer", "qt", "ctk", "vtk", "slicer_core", "PythonQt"} == set()


@pytest.mark.parametrize("name", ["MRMLBridge.py", "CLIProcess.py", "SyntheticCase.py"])
def test_bridge_and_runner_are_qt_free(name):
    assert importedTopLevelNames(SLICER_LIB_DIR / name) & {"qt", "ctk", "PythonQt"} == set()


def test_bridge_never_uses_the_global_scene():
    """It takes the scene from the nodes, so it works on any scene (and without the application)."""
    tree = ast.parse((SLICER_LIB_DIR / "MRMLBridge.py").read_text(encoding="utf-8"))
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer"
    }
    assert used and used & {"mrmlScene", "modules", "app"} == set()


def test_ui_matches_the_parameter_node_and_the_widget():
    ui = ET.parse(MODULE_DIR / "Resources" / "UI" / "MedDiffFT.ui")
    widgets = {widget.get("name") for widget in ui.iter("widget")}
    bound = {
        prop.find("string").text
        for prop in ui.iter("property")
        if prop.get("name") == "SlicerParameterName"
    }
    logic = ast.parse((SLICER_LIB_DIR / "Logic.py").read_text(encoding="utf-8"))
    parameterClass = next(node for node in logic.body if isinstance(node, ast.ClassDef) and node.name == "MedDiffFTParameterNode")
    fields = {node.target.id for node in parameterClass.body if isinstance(node, ast.AnnAssign)}
    assert bound <= fields, "SlicerParameterName without a parameter"
    assert fields - bound == {"inputSegmentation", "segmentIds", "allowedRegionSegmentId"}  # segment selectors are synced by hand
    usedByWidget = set(re.findall(r"self\.ui\.(\w+)", (SLICER_LIB_DIR / "Widget.py").read_text(encoding="utf-8")))
    assert usedByWidget and usedByWidget <= widgets, f"missing in the .ui: {sorted(usedByWidget - widgets)}"


def test_requirements_are_lower_bounds_covering_the_library_dependencies():
    lines = [
        line.strip()
        for line in (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+>=[0-9][0-9.]*", line) for line in lines), "lower bounds only"
    names = {requirementName(line) for line in lines}
    assert "torch" not in names
    libraryDependencies = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    needed = {requirementName(requirement) for requirement in libraryDependencies} - SLICER_PROVIDED_PACKAGES
    assert sorted(needed - names) == [], "add these to MedDiffFT/Resources/requirements.txt"


def test_catalog_entry_and_icons():
    entry = json.loads((REPO / "MedDiffFT.json").read_text(encoding="utf-8"))
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/")
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["category"] and entry["scm_url"].startswith("https://")
    with Image.open(REPO / "Resources" / "MedDiffFT.png") as extensionIcon:
        assert (extensionIcon.format, extensionIcon.size) == ("PNG", (128, 128))
    with Image.open(MODULE_DIR / "Resources" / "Icons" / "MedDiffFT.png") as moduleIcon:
        assert moduleIcon.format == "PNG"
