from internvit.model.vision import InternVisionModel as InternVisionModel
from internvit.model.vision import InternVisionOutput as InternVisionOutput
