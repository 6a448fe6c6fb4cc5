"""Errors raised for bad input: each names the problem and the fix."""


class MedDiffFTError(ValueError):
    """A problem with the user's input or request; the message says how to fix it."""


class Cancelled(MedDiffFTError):
    """The user cancelled the run; nothing was written."""


class PlacementError(MedDiffFTError):
    """No new lesion could be placed for one sample; the sample is rejected, the run goes on."""
