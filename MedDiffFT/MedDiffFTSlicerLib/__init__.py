"""The Slicer side of MedDiffFT, kept in a package because Slicer loads every top-level ``.py`` of
a module folder as a module of its own.

Layers: ``MRMLBridge`` (nodes <-> library files and command lines; Qt-free) and ``CLIProcess``
(the library CLI in a child process; Qt-free) are used by ``Logic`` (orchestration, parameter
node, dependencies), which is used by ``Widget`` (UI only).
"""
