from nemoh.models.forward_context import ForwardContext
from nemoh.models.nemotron_h import NemotronHForCausalLM

__all__ = ["ForwardContext", "NemotronHForCausalLM"]
