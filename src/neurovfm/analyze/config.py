"""Options of ``neurovfm analyze``, with the cut-offs its warnings use (no numbers in the code)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from neurovfm.explain import MAP_SOURCES
from neurovfm.explain.maps import SideRule

HEAD_BODY_PARTS = ("", "HEAD", "BRAIN", "SKULL", "HEADNECK", "HEAD_NECK", "CEREBRUM", "NEURO", "CRANIUM")


@dataclass
class AnalyzeConfig:
    maps: str = "top-k"  # top-k | all | none
    top_k: int = 3
    # one of MAP_SOURCES; None: the map each head's model folder records (chosen on validation), else head
    map_source: str | None = None
    modality: str | None = None  # for NIfTI without a sidecar
    attention: str = "auto"
    tokens_per_batch: int = 16384
    device: str = "cpu"
    side: SideRule = field(default_factory=SideRule)
    # warnings: a scan outside the model's world is analysed, but never silently
    min_adult_age: int = 18
    max_slice_thickness_mm: float = 6.0
    min_study_tokens: int = 64
    max_head_width_mm: float = 230.0  # left-right extent of the largest body part; heads are ~130-190 mm
    progress: bool = False

    def __post_init__(self) -> None:
        if self.maps not in ("top-k", "all", "none"):
            raise ValueError(f"--maps must be top-k, all or none, not {self.maps!r}")
        if self.map_source is not None and self.map_source not in MAP_SOURCES:
            raise ValueError(f"--map-source must be one of {', '.join(MAP_SOURCES)}, not {self.map_source!r}")
        if self.top_k < 1:
            raise ValueError("--top-k must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)
