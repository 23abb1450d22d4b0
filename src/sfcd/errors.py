"""One exception family for problems a user can act on (bad input, missing artifact, offline hub id).

The CLI prints these as one line, ``error: ...``, and exits non-zero; internal bugs stay ordinary exceptions.
"""

from __future__ import annotations


class SfcdError(Exception):
    """A user-facing problem: say what was wrong, what was expected and what to do."""


class ConfigError(SfcdError):
    """A configuration value, preset or key that cannot be used."""


class MissingArtifactError(SfcdError):
    """An artifact (run directory, checkpoint, file) that a stage needs does not exist."""


class InputError(SfcdError):
    """A file or value given as input is malformed."""


class OfflineError(SfcdError):
    """Something needs the network (a hub download) and the network is not available."""
