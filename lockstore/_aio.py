"""asyncio API: ``Store.atransaction()`` and ``aread()`` (to be built by the CLI/asyncio issue)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._store import Store


def atransaction(
    store: Store, timeout: float | None, *, blocking: bool | None, label: str | None
) -> contextlib.AbstractAsyncContextManager[Store]:
    raise NotImplementedError("atransaction is not built yet")


async def aread(path: Any, default: Any = None, **kwargs: Any) -> Any:
    raise NotImplementedError("aread is not built yet")
