"""Errors a user can cause. Each message says what is wrong and what to do about it.

The command line prints ``str(error)`` and exits non-zero; the Slicer module shows it in a dialog.
Programming errors (bugs) are ordinary Python exceptions and are not wrapped.
"""


class BrainLesionSAMError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class InputImageError(BrainLesionSAMError):
    """An input volume cannot be used (unreadable, empty, constant, NaN, wrong dimension...)."""


class MissingModalityError(BrainLesionSAMError):
    """A modality the chosen method requires was not given."""


class GeometryError(BrainLesionSAMError):
    """Volumes do not overlap in physical space, or a box lies outside the image."""


class UnknownMethodError(BrainLesionSAMError):
    """No method is registered under the requested name."""


class WeightsError(BrainLesionSAMError):
    """A weights file is missing, corrupt, or belongs to another method or configuration."""


class OutputPathError(BrainLesionSAMError):
    """An output cannot be written (folder missing or not writable, file exists)."""


class CancelledError(BrainLesionSAMError):
    """The user cancelled a running job; nothing was written."""


class BoxRequiredError(BrainLesionSAMError):
    """A method that segments only inside a box prompt was run without a box."""


class InputWarning(UserWarning):
    """An input was usable only after a change the user should know about (NaN voxels set to 0, a
    box clipped to the volume), or the chosen weights are a catalogue 'experimental' model. The
    message says what was done; the command line prints it on one line, ``warning: ...``."""
