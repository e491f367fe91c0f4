"""Sparse autoencoders: the SAE module (`sae`), its architectures, file formats (Gemma Scope, SAELens, sparsify,
dictionary_learning), splicing into a model (`splice`) and quality metrics (`metrics`). Training is in toolkit.training.
"""

from toolkit.config import SAEConfig
from toolkit.sae.architectures import ARCHITECTURES, Architecture, get_architecture, register
from toolkit.sae.formats import DEFAULT_L0, gemma_scope_path
from toolkit.sae.sae import SAE, SAEOutput, SparseCodes

from_gemma_scope = SAE.from_gemma_scope
from_saelens = SAE.from_saelens
from_sparsify = SAE.from_sparsify
from_dictionary_learning = SAE.from_dictionary_learning

__all__ = [
    "ARCHITECTURES", "DEFAULT_L0", "SAE", "Architecture", "SAEConfig", "SAEOutput", "SparseCodes",
    "from_dictionary_learning", "from_gemma_scope", "from_saelens", "from_sparsify", "gemma_scope_path",
    "get_architecture", "register",
]
