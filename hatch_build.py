"""Hatch build hook: compile the fast path of do_iommu_op into the package.

An editable install gets the module beside its source (``xenemu/core/iommu``); a wheel gets it
force-included and a platform tag.  Set ``XENEMU_NO_FAST_PATH=1`` to build a pure-Python
package (xenemu then runs every op through the Python handlers, only slower).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class FastPathBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or os.environ.get("XENEMU_NO_FAST_PATH") == "1":
            return
        path = Path(self.root) / "xenemu" / "core" / "iommu" / "fast_build.py"
        spec = importlib.util.spec_from_file_location("xenemu_fast_build", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if version == "editable":
            module.build(path.parent)
            return
        out = module.build(Path(tempfile.mkdtemp(prefix="xenemu-wheel-")))
        build_data["force_include"][str(out)] = f"xenemu/core/iommu/{out.name}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
