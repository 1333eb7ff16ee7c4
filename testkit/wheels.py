"""Python packages for the boxes' pip: minimal pure-Python wheels, built in memory."""

from __future__ import annotations

import io
import zipfile


def pure_wheel(name: str, version: str, module_source: str) -> bytes:
    """A wheel (``{name}-{version}-py3-none-any.whl``) holding the module ``{name}.py``."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": module_source,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: boxlite-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for path, text in {**files, f"{dist}/RECORD": record}.items():
            zf.writestr(path, text)
    return out.getvalue()
