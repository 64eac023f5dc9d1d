"""nemoh: a readable inference and serving engine for NVIDIA Nemotron 3 hybrid models."""
from nemoh.config import NemotronHConfig
from nemoh.sampling_params import SamplingParams

__version__ = "0.1.0"


def load_model(path, dtype="auto", device="cpu", strict=False, progress=None):
    """Load a NemotronH checkpoint directory; see nemoh.loader.load_model."""
    from nemoh.loader import load_model as _load

    return _load(path, dtype=dtype, device=device, strict=strict, progress=progress)


def __getattr__(name):
    # LLM pulls in the engine; import it only when asked for so that `import nemoh` stays light.
    if name == "LLM":
        from nemoh.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "NemotronHConfig", "SamplingParams", "load_model"]
