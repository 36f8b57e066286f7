"""The transformers and peft versions uti-peft is tested with, and the named flags its patches check.

``.ci/run`` runs the suite on the newest releases and a second job on the floors of `CHECKED_WITH` (the floors in
``pyproject.toml``). On another version nothing is refused: a warning says once what was tested, other adapters are
unaffected, and an internal our adapter needs that is missing or reshaped raises `UnsupportedVersionError`.
"""

from __future__ import annotations

import warnings
from importlib.metadata import version

from packaging.version import Version

from ..errors import UnsupportedVersionError

# (floor, newest tested): the floor is what .ci/run's floor job installs; patch releases of the newest are included
CHECKED_WITH: dict[str, tuple[str, str]] = {"transformers": ("5.0.0", "5.25.0"), "peft": ("0.21.0", "0.21.2")}

TRANSFORMERS = Version(version("transformers"))
PEFT = Version(version("peft"))

# transformers 5.0 keeps LoadStateDictInfo in modeling_utils (6 fields); 5.1 moved it to utils.loading_report
# (5 fields); 5.16 added a sixth. `_compat` builds it by field name.
is_transformers_ge_v5_1_0 = TRANSFORMERS >= Version("5.1.0")


def installed() -> dict[str, str]:
    return {"transformers": str(TRANSFORMERS), "peft": str(PEFT)}


def tested_ranges() -> dict[str, str]:
    """``{"transformers": "5.0.0 to 5.25.x", ...}``."""
    return {dist: f"{low} to {'.'.join(high.split('.')[:2])}.x" for dist, (low, high) in CHECKED_WITH.items()}


def is_tested(dist: str, found: Version) -> bool:
    low, high = (Version(v) for v in CHECKED_WITH[dist])
    return Version(low.base_version) <= Version(found.base_version) and found.release[:2] <= high.release[:2]


def _describe(ranges: dict[str, str]) -> str:
    return " and ".join(f"{dist} {span}" for dist, span in ranges.items())


_warned = False


def warn_once_if_untested() -> None:
    """One warning per process naming the tested ranges, when transformers or peft is outside them."""
    global _warned
    found = {"transformers": TRANSFORMERS, "peft": PEFT}
    untested = [f"{dist} {found[dist]}" for dist in CHECKED_WITH if not is_tested(dist, found[dist])]
    if untested and not _warned:
        _warned = True
        warnings.warn(
            f"uti-peft is tested with {_describe(tested_ranges())}; found {', '.join(untested)}. Other adapters are "
            "unaffected; a row-extension adapter that needs something this version lacks fails with "
            "UnsupportedVersionError",
            stacklevel=3,
        )


def unsupported(what: str, cause: BaseException) -> UnsupportedVersionError:
    """The error for a row-extension adapter whose loading or saving needs ``what``, which is missing here."""
    return UnsupportedVersionError(
        f"row-extension adapter: {what} is not available in the installed {_describe(installed())} "
        f"({type(cause).__name__}: {cause}); uti-peft is tested with {_describe(tested_ranges())}. Install a tested "
        "version (other adapters are unaffected)",
        versions=installed(), tested=tested_ranges(),
    )
