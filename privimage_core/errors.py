"""Errors raised on bad input.

Every message names the problem and the fix in one line, and is raised before
any expensive work starts (see README, "Bad input").
"""


class PrivImageError(Exception):
    """Base class for errors a user can fix."""


class ConfigError(PrivImageError):
    """The configuration is invalid: unknown key, value out of range, ..."""


class DataError(PrivImageError):
    """A dataset is missing, empty, or has the wrong shape or mode."""


class PrivacyBudgetError(PrivImageError):
    """A mechanism would exceed the privacy budget, or the budget is invalid."""


class MissingWeightsError(PrivImageError):
    """Offline model weights (e.g. FID Inception) are not installed."""
