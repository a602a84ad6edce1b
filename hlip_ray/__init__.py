"""hlip-ray: HLIP-style 3D medical vision-language models on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hlip-ray")
except PackageNotFoundError:   # the source tree, not installed
    __version__ = "unknown"
