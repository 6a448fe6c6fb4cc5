"""MedDiffFT: few-shot diffusion inpainting that turns a few labeled medical images into many
realistic, correctly labeled synthetic image+label pairs (MedDiff-FT, MICCAI 2025).

Pure Python: no ``slicer`` or ``qt`` import anywhere in this package. One module per stage:
``caseio`` (read/write cases with exact geometry), ``slicing`` (slices, intensity, windows),
``masks`` (guide-mask sources), ``compact`` (the embedded pixel-space backbone), ``finetune``
(training loop), ``guidance`` (dynamic adaptive guiding mask sampling), ``generate`` (samples for
cases), ``outputs`` (atomic output folders, manifest, preview), ``cli`` (the ``meddiffft`` command).
"""

__version__ = "0.1.0"
