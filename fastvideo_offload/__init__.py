"""Layer-wise weight offloading for large diffusion transformers.

    import fastvideo_offload
    handle = fastvideo_offload.enable(transformer)   # blocks stream from host memory
    ...
    handle.disable()                                 # every weight back on the device
"""

from .api import disable, enable, handle_of
from .checkpoint import CheckpointWeights
from .config import OffloadConfig
from .integrations.fastvideo import patch_fastvideo, unpatch_fastvideo
from .loading import from_pretrained
from .offloader import OffloadHandle
from .pipeline import PipelineHandle

__all__ = ["CheckpointWeights", "OffloadConfig", "OffloadHandle", "PipelineHandle", "disable", "enable",
           "from_pretrained", "handle_of", "patch_fastvideo", "unpatch_fastvideo"]
