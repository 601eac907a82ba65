"""Progress bars (tqdm; the notebook widget when running in Jupyter)."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(it: Iterable[T], *, desc: str = "", total: int | None = None, disable: bool = False,
                 **kw) -> Iterable[T]:
    """Wrap an iterable in a progress bar; ``EMOLENS_PROGRESS=0`` turns all bars off."""
    if os.environ.get("EMOLENS_PROGRESS", "1") == "0":
        disable = True
    return tqdm(it, desc=desc, total=total, disable=disable, leave=False, dynamic_ncols=True, **kw)
