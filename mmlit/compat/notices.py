"""Library notices that no user of mmlit can act on, filtered by their exact message (not by category or module: any
other warning of the same libraries still shows). ``mmlit`` installs the filters in its command line (``cli.main``,
every rank); tests/test_compat.py fails when a library stops emitting one of them, so that its filter goes too.

* Lightning's ``_pytree`` (its batch-size and ``apply_to_collection`` helpers) checks ``isinstance(x, LeafSpec)``,
  which torch 2.14 deprecates (FutureWarning): Lightning's to fix, in every run that logs.
* Lightning's tips to install ``litlogger`` for its experiments platform (an INFO line at every ``Trainer`` made
  without its logger) and ``litmodels`` for its model registry (at ``Trainer.fit``): advertisements.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["LEAF_SPEC", "LITLOGGER_TIP", "LITMODELS_TIP", "quiet_library_notices"]

LEAF_SPEC = ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
             "treespec.is_leaf()` instead.")
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
LITMODELS_TIP = "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]"
_LIGHTNING_INFO = "lightning.pytorch.utilities.rank_zero"  # the logger of Lightning's rank_zero_info


class _Without(logging.Filter):
    """Drops records whose message starts with one of ``starts``."""

    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_library_notices() -> None:
    """Filter the notices above (idempotent)."""
    warnings.filterwarnings("ignore", message=re.escape(LEAF_SPEC), category=FutureWarning)
    logger = logging.getLogger(_LIGHTNING_INFO)
    if not any(isinstance(f, _Without) for f in logger.filters):
        logger.addFilter(_Without(LITLOGGER_TIP, LITMODELS_TIP))
