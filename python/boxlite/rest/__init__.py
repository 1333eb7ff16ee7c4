"""The REST client: a runtime whose boxes live on a ``boxlite serve`` server.

>>> rt = boxlite.Boxlite.rest(boxlite.BoxliteRestOptions(
...     url="http://10.0.0.5:8100", credential=boxlite.ApiKeyCredential("..."))
>>> box = await rt.create(boxlite.BoxOptions(image="alpine"))

The same ``Boxlite``, ``Box`` and ``Execution`` classes as locally, over the backend in
``runtime.py`` (which needs ``httpx`` and ``websockets``, imported only when a remote runtime is
made); see docs/rest-client.md.
"""

from __future__ import annotations

from .options import ApiKeyCredential, BoxliteRestOptions

__all__ = ["ApiKeyCredential", "BoxliteRestOptions"]
