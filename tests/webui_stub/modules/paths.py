"""``modules.paths`` stand-in."""

import os
import tempfile

script_path = os.path.join(tempfile.gettempdir(), "webui_stub")
models_path = os.path.join(script_path, "models")
