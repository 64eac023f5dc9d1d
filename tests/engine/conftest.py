"""Engine test helpers: one tiny checkpoint (with MTP and the demo tokenizer) shared by the engine tests."""
import pytest

from nemoh.sampling_params import SamplingParams

from engine_helpers import PROMPTS


@pytest.fixture(scope="session")
def ckpt(tiny_checkpoint_with_oracle):
    """(path, hf_model) of the shared tiny random checkpoint."""
    return tiny_checkpoint_with_oracle


@pytest.fixture(scope="session")
def make_llm(ckpt):
    from nemoh import LLM

    def make(**kwargs):
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("max_model_len", 256)
        kwargs.setdefault("cache_memory_gb", 0.05)
        kwargs.setdefault("max_num_seqs", 16)
        return LLM(ckpt[0], **kwargs)
    return make


@pytest.fixture(scope="session")
def llm(make_llm):
    return make_llm()


@pytest.fixture(scope="session")
def greedy_ref(llm):
    """Greedy reference continuations of PROMPTS, each generated alone."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return [llm.generate([p], params)[0].outputs[0].token_ids for p in PROMPTS]
