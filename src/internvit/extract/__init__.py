from internvit.extract.local import ExtractSummary as ExtractSummary
from internvit.extract.local import extract_features as extract_features
from internvit.extract.sources import expand_sources as expand_sources
