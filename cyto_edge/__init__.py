"""cyto-edge: cervical-cytology cell detection on microscope devices.

Research use only. Not for diagnostic use.
"""

__version__ = "0.1.0"

DISCLAIMER = "Research use only. Not for diagnostic use."
