from internvit.extract.core import ExtractOptions as ExtractOptions
from internvit.extract.core import ExtractSummary as ExtractSummary
from internvit.extract.local import extract_features as extract_features
from internvit.sources import expand_sources as expand_sources
